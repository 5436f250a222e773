//! Signed-in users in a real browser, through `lb`: the apps run in token mode and the page
//! gets its tokens from the demo issuer (`app demo-issuer`). Two people sign in by name and
//! talk: each message shows the token's name and user, on the other person's page too. A third
//! person, whose token grants no private room, is refused from it and told so; a person the
//! issuer grants the room gets in.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::Result;
use testkit::process::{Proc, Ready, workspace_bin};
use tests::browser::{Browser, Page};
use tests::stack::{Options, Stack};
use tokio::process::Command;

const WITHIN: Duration = Duration::from_secs(15);

fn state_is(state: &str) -> String {
    format!("document.getElementById('state').dataset.state === {state:?}")
}

/// Types `name` into the page's name field and signs in with Enter.
async fn sign_in(page: &Page, name: &str) -> Result<()> {
    page.wait_for(&state_is("signed out"), WITHIN).await?;
    page.type_into("name", name).await?;
    page.press_enter().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_in_people_talk_under_their_token_names_and_grants_hold() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("token.secret");
    std::fs::write(&secret, [b'd'; 48])?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
    let mut command = Command::new(workspace_bin("app")?);
    command
        .arg("demo-issuer")
        .arg("--secret-file")
        .arg(&secret)
        .args(["--listen", "127.0.0.1:0", "--grant", "alice=private"]);
    let issuer = Proc::spawn("issuer", command, Ready::Listening(&["http"])).await?;
    let stack = Stack::start_with(&Options {
        apps: 2,
        app_config: format!(
            "[auth]\nmode = \"token\"\nsecret_file = \"{}\"\ntoken_url = \"http://{}/token\"\n",
            secret.display(),
            issuer.addr("http"),
        ),
        ..Options::default()
    })
    .await?;
    let url = format!("https://localhost:{}/", stack.lb.addr("https").port());
    let browser = Browser::launch(&stack.ca_file()).await?;
    let alice = browser.open(&url).await?;
    let bob = browser.open(&url).await?;
    sign_in(&alice, "Alice").await?;
    sign_in(&bob, "Bob").await?;
    for page in [&alice, &bob] {
        page.wait_for(&state_is("connected"), WITHIN).await?;
    }
    let locked = bob
        .eval("[document.getElementById('name').disabled, document.getElementById('retry').textContent].join('|')")
        .await?;
    assert_eq!(locked, "true|signed in as Bob");

    alice.type_into("content", "hello from alice").await?;
    alice.press_enter().await?;
    let stamped = "Array.from(document.querySelectorAll('#messages .name[data-user]'))\
                   .some(n => n.dataset.user === 'alice' && n.textContent === 'Alice' \
                   && n.parentElement.textContent.includes('hello from alice'))";
    for page in [&bob, &alice] {
        page.wait_for(stamped, WITHIN).await?;
    }

    // Carol's token grants no private room: refused, and the page says so.
    let carol = browser.open(&format!("{url}#room=private")).await?;
    sign_in(&carol, "Carol").await?;
    carol.wait_for(&state_is("refused"), WITHIN).await?;
    let told = carol
        .eval("document.getElementById('messages').textContent.includes('room not granted')")
        .await?;
    assert_eq!(told, true);
    // Alice's does.
    let private = browser.open(&format!("{url}#room=private")).await?;
    sign_in(&private, "alice").await?;
    private.wait_for(&state_is("connected"), WITHIN).await?;
    Ok(())
}
