//! The API's endpoints, each documented for the OpenAPI file (`utoipa`, from these very
//! handlers and types), and [`ApiDoc`], that file.
//!
//! A room in a path is a room name as `/ws?room=` takes it, or `~` for the default room.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::{Api, ApiError};
use crate::history::Range;
use crate::hub::rooms::Room;
use crate::position::MessageId;
use crate::presence::view::View;
use crate::protocol::{self, ChatMessage};
use crate::protocol::{BadRoom, parse_room};
use crate::ws::session::ROOM_READY_TIMEOUT;

/// The default room's name in API paths (no room name may contain `~`).
pub const DEFAULT_ROOM: &str = "~";
/// Messages a history page holds unless `limit` says otherwise.
pub const DEFAULT_PAGE: usize = 100;
/// The most messages one history page may hold.
pub const MAX_PAGE: usize = 1000;
/// Longest user id, as a token's `sub`.
pub const MAX_USER_CHARS: usize = 128;

/// A message to post: what a client sends, plus the user it speaks for.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PostMessage {
    /// The author's name, as a client's `name` (same length limit).
    pub name: String,
    /// The text, as a client's `content` (same length limit).
    pub content: String,
    /// The user the message is from (1 to 128 characters), stamped as `user`.
    pub user: Option<String>,
    /// The caller's own id for the message (1 to 64 of `A-Z a-z 0-9 _ -`): a retry with the
    /// same `cid` is published once and answered with the first one's id.
    pub cid: Option<String>,
}

/// Where a posted message is in the room's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct Posted {
    /// Its id (`<ms>-<seq>`), as clients and `GET .../history` see it.
    pub id: String,
    /// The history's epoch that id belongs to.
    pub epoch: String,
    /// `true`: this `cid` was posted before; nothing new was published.
    pub duplicate: bool,
}

/// The query of `GET /api/rooms/{room}/history`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Only messages after this id (paging forward).
    pub after: Option<String>,
    /// Only messages before this id (paging back: the newest ones before it).
    pub before: Option<String>,
    /// At most this many (1 to 1000, default 100).
    pub limit: Option<usize>,
}

/// A page of a room's history, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryPage {
    /// The room (`~`: the default room).
    pub room: String,
    /// The history's epoch; ids belong to it.
    pub epoch: String,
    /// The messages exactly as clients receive them (`time`, `name`, `content`, `id`,
    /// `epoch`, ...).
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<serde_json::Value>,
}

/// A member of a room: a user (signed in) or a name (anonymous connections that last used it).
#[derive(Debug, Serialize, ToSchema)]
pub struct Member {
    /// The user id, for signed-in members.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The name shown.
    pub name: String,
    /// Its connections, on every instance.
    pub conns: usize,
}

/// Who is in a room, on every instance.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomPresence {
    /// The room (`~`: the default room).
    pub room: String,
    /// Connections in the room, named or not.
    pub count: usize,
    /// Its members.
    pub members: Vec<Member>,
}

/// Every room with members.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomList {
    /// The rooms, by name.
    pub rooms: Vec<RoomPresence>,
}

/// A user's rooms.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserRooms {
    /// The room.
    pub room: String,
    /// The user's connections in it.
    pub conns: usize,
}

/// Whether a user is online anywhere.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserPresence {
    /// The user id.
    pub user: String,
    /// Connected to some room on some instance.
    pub online: bool,
    /// Its connections, every room together.
    pub conns: usize,
    /// The rooms it is in.
    pub rooms: Vec<UserRooms>,
}

/// Every error: what is wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The reason.
    pub error: String,
}

/// The OpenAPI document of the server API.
#[derive(OpenApi)]
#[openapi(
    info(title = "scaleout app server API", description = "Post into rooms, read history and presence. Every endpoint but this document needs `Authorization: Bearer <key>`."),
    paths(post_message, history, room_presence, list_rooms, user, disconnect),
    components(schemas(PostMessage, Posted, HistoryPage, Member, RoomPresence, RoomList, UserRooms, UserPresence, Disconnect, Disconnected, ErrorBody)),
    modifiers(&BearerKey)
)]
pub struct ApiDoc;

/// Adds the bearer key scheme every endpoint uses.
struct BearerKey;

impl utoipa::Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![SecurityRequirement::new(
            "api_key",
            Vec::<String>::new(),
        )]);
    }
}

/// `GET /api/openapi.json`.
pub async fn openapi() -> Response {
    Json(ApiDoc::openapi()).into_response()
}

/// The room of a path (`None`: the default room).
fn room_of(name: &str) -> Result<Option<&str>, ApiError> {
    if name == DEFAULT_ROOM {
        return Ok(None);
    }
    match parse_room(Some(name)) {
        Ok(Some(room)) => Ok(Some(room)),
        _ => Err(ApiError::bad_request(format!(
            "{BadRoom} (or ~ for the default room)"
        ))),
    }
}

/// The path name of a room's channel, given the default room's channel `base`.
fn name_of(base: &str, channel: &str) -> String {
    match channel
        .strip_prefix(base)
        .and_then(|rest| rest.strip_prefix(':'))
    {
        Some(room) => room.to_owned(),
        None => DEFAULT_ROOM.to_owned(),
    }
}

/// The room of `name` on this instance, ready for messages (created, subscribed and caught
/// up if it was new here); held while `Membership` lives.
async fn ready_room(
    api: &Api,
    room: Option<&str>,
) -> Result<crate::hub::rooms::Membership, ApiError> {
    let membership = api
        .app
        .rooms()
        .join(room)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    if !membership.room().ready_within(ROOM_READY_TIMEOUT).await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the room is not subscribed yet; try again shortly",
        ));
    }
    Ok(membership)
}

/// Post a message into a room, through the same path as a client's message.
#[utoipa::path(
    post,
    path = "/api/rooms/{room}/messages",
    params(("room" = String, Path, description = "Room name, or ~ for the default room")),
    request_body = PostMessage,
    responses(
        (status = 201, description = "Published", body = Posted),
        (status = 200, description = "This cid was published before", body = Posted),
        (status = 400, description = "Invalid room, JSON, field or cid", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 409, description = "The cid was used for another message", body = ErrorBody),
        (status = 413, description = "Body over max_frame_bytes", body = ErrorBody),
        (status = 503, description = "Redis unreachable", body = ErrorBody),
    )
)]
pub async fn post_message(
    State(api): State<Api>,
    Path(room): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let room = room_of(&room)?;
    let limits = &api.app.config().limits;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    if body.len() > limits.max_frame_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is {} bytes; the limit is {} (max_frame_bytes)",
                body.len(),
                limits.max_frame_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("the body is not UTF-8 text"))?;
    let mut incoming =
        protocol::parse_incoming(text, limits.max_name_chars, limits.max_content_chars)
            .map_err(ApiError::bad_request)?;
    incoming.user = user_field(text)?;
    let user = incoming.user.clone();
    let cid = incoming.cid.take();
    let message = ChatMessage::stamp(incoming, &chrono::Local::now());
    let body = message.to_json();
    let membership = ready_room(&api, room).await?;
    let published = membership
        .room()
        .publish(&body, cid.as_deref())
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    if published.duplicate
        && !same_message(membership.room(), published.id, &message, user.as_deref()).await
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this cid was used for another message; nothing was published",
        ));
    }
    let status = if published.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let posted = Posted {
        id: published.id.to_string(),
        epoch: published.epoch,
        duplicate: published.duplicate,
    };
    Ok((status, Json(posted)).into_response())
}

/// The optional `user` of a posted message: a string of 1 to 128 characters.
fn user_field(text: &str) -> Result<Option<String>, ApiError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|_| ApiError::bad_request("the body is not JSON"))?;
    match value.get("user") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(user))
            if (1..=MAX_USER_CHARS).contains(&user.chars().count()) =>
        {
            Ok(Some(user.clone()))
        }
        Some(_) => Err(ApiError::bad_request(format!(
            "field \"user\" must be a string of 1 to {MAX_USER_CHARS} characters"
        ))),
    }
}

/// Whether the message kept under `id` has the name, content and user of `message`: a `cid`
/// reused for the same message is a retry, for another one a mistake. A message trimmed away
/// since cannot be compared and counts as the same.
async fn same_message(
    room: &Room,
    id: MessageId,
    message: &ChatMessage,
    user: Option<&str>,
) -> bool {
    let before = MessageId {
        ms: id.ms.saturating_add(u64::from(id.seq == u64::MAX)),
        seq: id.seq.wrapping_add(1),
    };
    let range = Range {
        after: None,
        before: Some(before),
        limit: 1,
    };
    let Ok(page) = room.page(&range).await else {
        return true;
    };
    let Some(kept) = page.messages.iter().find(|d| d.id == Some(id)) else {
        return true;
    };
    let Ok(kept) = serde_json::from_str::<serde_json::Value>(kept.text.as_str()) else {
        return true;
    };
    kept.get("name").and_then(|v| v.as_str()) == Some(message.name.as_str())
        && kept.get("content").and_then(|v| v.as_str()) == Some(message.content.as_str())
        && kept.get("user").and_then(|v| v.as_str()) == user
}

/// Read a page of a room's history: the same history a resuming client reads.
#[utoipa::path(
    get,
    path = "/api/rooms/{room}/history",
    params(("room" = String, Path, description = "Room name, or ~ for the default room"), HistoryQuery),
    responses(
        (status = 200, description = "The page, oldest first", body = HistoryPage),
        (status = 400, description = "Invalid room, id or limit", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 503, description = "Redis unreachable", body = ErrorBody),
    )
)]
pub async fn history(
    State(api): State<Api>,
    Path(name): Path<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<HistoryPage>, ApiError> {
    let room = room_of(&name)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let id = |key: &str, value: Option<String>| {
        value
            .map(|v| v.parse::<MessageId>())
            .transpose()
            .map_err(|_| ApiError::bad_request(format!("`{key}` is not a message id (<ms>-<seq>)")))
    };
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "`limit` must be 1 to {MAX_PAGE}"
        )));
    }
    let range = Range {
        after: id("after", query.after)?,
        before: id("before", query.before)?,
        limit,
    };
    let membership = api
        .app
        .rooms()
        .join(room)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    let page = membership
        .room()
        .page(&range)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    let messages = page
        .messages
        .iter()
        .filter_map(|d| serde_json::from_str(d.text.as_str()).ok())
        .collect();
    Ok(Json(HistoryPage {
        room: name,
        epoch: page.epoch,
        messages,
    }))
}

/// The members of `view`, as the API shows them.
fn members(view: &View) -> Vec<Member> {
    view.members()
        .map(|m| Member {
            user: m.user.clone(),
            name: m.name.clone(),
            conns: m.conns,
        })
        .collect()
}

fn presence_off() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "presence is switched off on this deployment (presence = false)",
    )
}

fn unreachable(e: redis::RedisError) -> ApiError {
    tracing::warn!(error = %e, "API: presence read failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "presence is unreachable: Redis did not answer; try again shortly",
    )
}

/// Who is in a room, on every instance.
#[utoipa::path(
    get,
    path = "/api/rooms/{room}/presence",
    params(("room" = String, Path, description = "Room name, or ~ for the default room")),
    responses(
        (status = 200, description = "The room's members", body = RoomPresence),
        (status = 400, description = "Invalid room", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "Presence is off", body = ErrorBody),
        (status = 503, description = "Redis unreachable", body = ErrorBody),
    )
)]
pub async fn room_presence(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> Result<Json<RoomPresence>, ApiError> {
    let room = room_of(&name)?;
    let presence = api.app.presence();
    if !presence.is_on() {
        return Err(presence_off());
    }
    let channel = api.app.rooms().channel(room);
    let view = presence.room(&channel).await.map_err(unreachable)?;
    Ok(Json(RoomPresence {
        room: name,
        count: view.count(),
        members: members(&view),
    }))
}

/// The views of every room with members.
async fn all_rooms(api: &Api) -> Result<Vec<(String, View)>, ApiError> {
    let presence = api.app.presence();
    if !presence.is_on() {
        return Err(presence_off());
    }
    let base = api.app.rooms().default_room().channel().to_owned();
    let mut rooms = Vec::new();
    for channel in presence.channels().await.map_err(unreachable)? {
        let view = presence.room(&channel).await.map_err(unreachable)?;
        if view.count() > 0 {
            rooms.push((name_of(&base, &channel), view));
        }
    }
    Ok(rooms)
}

/// Every room with members, and its members.
#[utoipa::path(
    get,
    path = "/api/rooms",
    responses(
        (status = 200, description = "The rooms", body = RoomList),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "Presence is off", body = ErrorBody),
        (status = 503, description = "Redis unreachable", body = ErrorBody),
    )
)]
pub async fn list_rooms(State(api): State<Api>) -> Result<Json<RoomList>, ApiError> {
    let rooms = all_rooms(&api)
        .await?
        .into_iter()
        .map(|(room, view)| RoomPresence {
            room,
            count: view.count(),
            members: members(&view),
        })
        .collect();
    Ok(Json(RoomList { rooms }))
}

/// Whether a user is online anywhere: its rooms and connections.
#[utoipa::path(
    get,
    path = "/api/users/{user}",
    params(("user" = String, Path, description = "User id (a token's sub)")),
    responses(
        (status = 200, description = "The user's presence", body = UserPresence),
        (status = 400, description = "Invalid user id", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "Presence is off", body = ErrorBody),
        (status = 503, description = "Redis unreachable", body = ErrorBody),
    )
)]
pub async fn user(
    State(api): State<Api>,
    Path(user): Path<String>,
) -> Result<Json<UserPresence>, ApiError> {
    check_user(&user)?;
    let rooms: Vec<UserRooms> = all_rooms(&api)
        .await?
        .into_iter()
        .filter_map(|(room, view)| {
            view.member_of(&user).map(|m| UserRooms {
                room,
                conns: m.conns,
            })
        })
        .collect();
    let conns = rooms.iter().map(|r| r.conns).sum();
    Ok(Json(UserPresence {
        user,
        online: conns > 0,
        conns,
        rooms,
    }))
}

/// The body of `POST /api/users/{user}/disconnect` (may be empty).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Disconnect {
    /// Keep the user out until then (Unix seconds): its tokens issued before then are refused
    /// until then. Absent: only the open connections are closed.
    pub until: Option<u64>,
}

/// What a disconnect did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Disconnected {
    /// The user.
    pub user: String,
    /// Until when it is kept out, if it is.
    pub until: Option<u64>,
}

/// A user id in a path: 1 to 128 characters, as a token's `sub`.
fn check_user(user: &str) -> Result<(), ApiError> {
    if (1..=MAX_USER_CHARS).contains(&user.chars().count()) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "a user id is 1 to {MAX_USER_CHARS} characters"
        )))
    }
}

/// Close a signed-in user's connections on every instance (close code 4410), and with `until`
/// keep it out until then, as `app disconnect` does.
#[utoipa::path(
    post,
    path = "/api/users/{user}/disconnect",
    params(("user" = String, Path, description = "User id (a token's sub)")),
    request_body = Disconnect,
    responses(
        (status = 200, description = "Told to every instance", body = Disconnected),
        (status = 400, description = "Invalid user id or body", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 503, description = "Redis unreachable", body = ErrorBody),
    )
)]
pub async fn disconnect(
    State(api): State<Api>,
    Path(user): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Disconnected>, ApiError> {
    check_user(&user)?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let request: Disconnect = if body.iter().all(u8::is_ascii_whitespace) {
        Disconnect::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "the body is not {{\"until\": <Unix seconds>}}: {e}"
            ))
        })?
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    api.app
        .users()
        .disconnect(&user, request.until, now)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok(Json(Disconnected {
        user,
        until: request.until.filter(|&until| until > now),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_paths_and_channels_map_both_ways() {
        assert_eq!(room_of("~").unwrap(), None);
        assert_eq!(room_of("lobby").unwrap(), Some("lobby"));
        assert_eq!(room_of("a b").unwrap_err().status, StatusCode::BAD_REQUEST);
        assert_eq!(name_of("simple-chat", "simple-chat"), "~");
        assert_eq!(name_of("simple-chat", "simple-chat:lobby"), "lobby");
    }

    #[test]
    fn a_user_is_a_string_of_1_to_128_characters() {
        assert!(user_field(r#"{"user": 5}"#).is_err());
        assert!(user_field(r#"{"user": ""}"#).is_err());
        assert_eq!(
            user_field(r#"{"user": "u"}"#).unwrap().as_deref(),
            Some("u")
        );
    }

    #[test]
    fn the_openapi_document_names_every_endpoint_and_the_key() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for path in [
            "/api/rooms",
            "/api/rooms/{room}/messages",
            "/api/rooms/{room}/history",
            "/api/rooms/{room}/presence",
            "/api/users/{user}",
            "/api/users/{user}/disconnect",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["api_key"]["scheme"],
            "bearer"
        );
    }
}
