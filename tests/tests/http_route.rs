//! The original deployment's HTTP route (`dispatcher serve --http-listen`), called exactly as
//! a portal written for the original calls it: a plain HTTP/1.1 GET, JSON back. (Callers
//! without the right credentials, over plaintext and TLS, are a case of the fault suite's
//! attacks group.)
use vncdispatch_tests::agent::free_port;
use vncdispatch_tests::original_route::get;
use vncdispatch_tests::rig::{Rig, RigOptions};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{procs, require_root_and_tigervnc};

#[tokio::test(flavor = "multi_thread")]
async fn a_portal_of_the_original_gets_a_desktop_over_http() {
    require_root_and_tigervnc();
    let http: std::net::SocketAddr = ([127, 0, 0, 1], free_port([127, 0, 0, 1].into())).into();
    let rig = Rig::start(RigOptions {
        api_secret: true,
        dispatcher_extra: vec!["--http-listen".into(), http.to_string()],
        ..Default::default()
    })
    .await;
    let secret = std::fs::read_to_string(rig.api_secret.as_ref().expect("secret file"))
        .expect("secret")
        .trim()
        .to_owned();
    let user = TestUser::create();
    let path = format!("/vncdispatch/{}/192.0.2.7", user.name);

    // Never a way around Dispatch's rules: no secret, no desktop.
    let (status, body) = get(http, &path, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("UNAUTHENTICATED")),
        "{body}"
    );
    assert!(procs::xvnc_of(user.uid).is_empty());

    let (status, doc) = get(http, &path, Some(&secret)).await;
    assert_eq!(status, 200, "{doc}");
    let mut keys: Vec<&str> = doc
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "blade", "display", "password", "remoteip", "token", "username", "vncpid"
        ],
        "the original's document"
    );
    assert_eq!(doc["username"], user.name.as_str());
    assert_eq!(doc["remoteip"], "192.0.2.7");
    assert_eq!(doc["blade"], "b1");
    assert_eq!(doc["token"].as_str().map(str::len), Some(60));
    let pid = doc["vncpid"].as_u64().expect("vncpid is a number");
    assert!(doc["display"].as_u64().is_some(), "display is a number");
    assert!(
        procs::xvnc_of(user.uid)
            .iter()
            .any(|p| u64::from(p.pid) == pid)
    );

    // A reconnect gets the same token, as from the original.
    let (status, again) = get(http, &path, Some(&secret)).await;
    assert_eq!((status, &again["token"]), (200, &doc["token"]));

    // Bad input is the same INVALID_ARGUMENT as over gRPC, as an HTTP status.
    let (status, body) = get(http, "/vncdispatch/a;b/192.0.2.7", Some(&secret)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{body}"
    );
    let (status, _) = get(
        http,
        &format!("/vncdispatch/{}/999.1.1.1", user.name),
        Some(&secret),
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = get(http, "/other", Some(&secret)).await;
    assert_eq!(status, 404, "{body}");
}
