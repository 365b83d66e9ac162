//! `quotactl` over TLS and mutual TLS against a real broker started
//! in-process on 127.0.0.1:0, with certificates made at test time (rcgen).
//! Every process wait is bounded in time.

use quota_broker::{hash_token, Settings};
use std::process::{Output, Stdio};
use std::time::Duration;
use testpki::Pki;
use tokio::process::Command;
use tokio::time::timeout;

const ADMIN: &str = "secret-ops";
/// Bound on any one quotactl run.
const LIMIT: Duration = Duration::from_secs(30);

/// A broker with mutual TLS and an admin token; returns its https URL.
async fn start(pki: &Pki) -> (String, quota_broker::Embedded) {
    let toml = format!(
        "[server]\nstate_dir = \"\"\n[server.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
         [[auth.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nrole = \"admin\"\ntenants = [\"*\"]\n\
         [[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"org\"\nroutes = [\"* /**\"]\n\
         permits = 600\nwindow_ms = 60000\n",
        pki.arg("server.pem"),
        pki.arg("server.key"),
        pki.arg("ca.pem"),
        hash_token(ADMIN),
    );
    let settings = Settings::from_toml(&toml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let broker = quota_broker::Embedded::spawn(listener, settings).unwrap();
    assert!(broker.started().await, "the broker started");
    (url, broker)
}

/// Runs quotactl with `args` (isolated from the caller's environment, but
/// with `env`) to completion within [`LIMIT`].
async fn quotactl(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_quotactl"));
    for var in [
        "QUOTA_BROKER_URL",
        "QUOTA_BROKER_TOKEN",
        "QUOTA_BROKER_TENANT",
        "QUOTA_BROKER_CA_CERT",
        "QUOTA_BROKER_CLIENT_CERT",
        "QUOTA_BROKER_CLIENT_KEY",
        "QUOTA_BROKER_TLS_SERVER_NAME",
    ] {
        c.env_remove(var);
    }
    c.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    timeout(LIMIT, c.output())
        .await
        .expect("quotactl finished in time")
        .expect("quotactl started")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_over_mutual_tls_with_flags_or_environment() {
    let pki = Pki::new("mtls");
    let (url, _stop) = start(&pki).await;
    let (ca, cert, key) = (
        pki.arg("ca.pem"),
        pki.arg("client.pem"),
        pki.arg("client.key"),
    );
    let out = quotactl(
        &[
            "status",
            "--json",
            "--broker",
            &url,
            "--token",
            ADMIN,
            "--ca-cert",
            &ca,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(json.contains("\"bucket\": \"org\""), "{json}");

    // Plaintext against the TLS port: one line that says what to do.
    let plain = url.replacen("https://", "http://", 1);
    let out = quotactl(&["status", "--broker", &plain, "--token", ADMIN], &[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("use an https:// URL"),
        "{}",
        stderr(&out)
    );

    let out = quotactl(
        &["status"],
        &[
            ("QUOTA_BROKER_URL", url.as_str()),
            ("QUOTA_BROKER_TOKEN", ADMIN),
            ("QUOTA_BROKER_CA_CERT", ca.as_str()),
            ("QUOTA_BROKER_CLIENT_CERT", cert.as_str()),
            ("QUOTA_BROKER_CLIENT_KEY", key.as_str()),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    // No client certificate: refused by the broker, reported on one line.
    let out = quotactl(
        &[
            "status",
            "--broker",
            &url,
            "--token",
            ADMIN,
            "--ca-cert",
            &ca,
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("quotactl: "), "{err}");
    assert!(!err.contains(ADMIN), "{err}");
    assert!(err.contains("--client-cert and --client-key"), "{err}");

    // The certificate checked against a name given apart from the URL's
    // host; a name it lacks, or no CA, each says what to do.
    let with = |extra: &[&str]| {
        let mut args = vec![
            "status",
            "--broker",
            &url,
            "--token",
            ADMIN,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
        ];
        args.extend_from_slice(extra);
        args.iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<String>>()
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        quotactl(&args, &[]).await
    };
    // By a name the certificate lacks ("localhost"): refused without the
    // flag, served with it.
    let by_name = url.replacen("127.0.0.1", "localhost", 1);
    let named = |extra: &[&str]| {
        let mut args = with(extra);
        args[2] = by_name.clone();
        args
    };
    let out = run(named(&["--ca-cert", &ca])).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--tls-server-name"),
        "{}",
        stderr(&out)
    );
    let out = run(named(&[
        "--ca-cert",
        &ca,
        "--tls-server-name",
        "broker.test",
    ]))
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(with(&["--ca-cert", &ca, "--tls-server-name", "other.test"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not valid for name") && stderr(&out).contains("--tls-server-name"),
        "{}",
        stderr(&out)
    );
    // Another CA's certificate to trust (the system's roots would do the
    // same, if the machine has any).
    let other = Pki::new("mtls-other-ca");
    let out = run(with(&["--ca-cert", &other.arg("ca.pem")])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--ca-cert with the CA that did"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn tls_options_that_cannot_work_are_refused_before_connecting() {
    let pki = Pki::new("misuse");
    let ca = pki.arg("ca.pem");
    let cert = pki.arg("client.pem");
    let key = pki.arg("client.key");
    let expired = pki.arg("expired-client.pem");
    let expired_key = pki.arg("expired-client.key");
    // Options that do not go together are a usage error (2); a file that
    // cannot be used, an error found when it is read (1).
    for (args, needle, code) in [
        (
            vec!["status", "--broker", "http://127.0.0.1:1", "--ca-cert", &ca],
            "need an https:// broker URL",
            2,
        ),
        (
            // One of several brokers given is not https.
            vec![
                "status",
                "--broker",
                "https://127.0.0.1:1,http://127.0.0.1:2",
                "--ca-cert",
                &ca,
            ],
            "need an https:// broker URL (got http://127.0.0.1:2)",
            2,
        ),
        (
            vec![
                "status",
                "--broker",
                "https://127.0.0.1:1",
                "--client-cert",
                &cert,
            ],
            "--client-cert and --client-key go together",
            2,
        ),
        (
            vec![
                "status",
                "--broker",
                "https://127.0.0.1:1",
                "--client-key",
                &key,
            ],
            "--client-cert and --client-key go together",
            2,
        ),
        (
            vec![
                "status",
                "--broker",
                "https://127.0.0.1:1",
                "--ca-cert",
                "/nonexistent/ca.pem",
            ],
            "cannot read --ca-cert /nonexistent/ca.pem",
            1,
        ),
        (
            vec![
                "status",
                "--broker",
                "https://127.0.0.1:1",
                "--ca-cert",
                &key,
            ],
            "no PEM certificate in it",
            1,
        ),
        (
            vec![
                "status",
                "--broker",
                "https://127.0.0.1:1",
                "--ca-cert",
                &ca,
                "--client-cert",
                &expired,
                "--client-key",
                &expired_key,
            ],
            "the certificate expired on",
            1,
        ),
        (
            vec![
                "status",
                "--broker",
                "http://127.0.0.1:1",
                "--tls-server-name",
                "broker.test",
            ],
            "need an https:// broker URL",
            2,
        ),
    ] {
        let out = quotactl(&args, &[]).await;
        assert_eq!(out.status.code(), Some(code), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

/// A truncated PEM file is said to be one, naming the flag and the file,
/// before connecting; before, the CA file passed its check (it has a BEGIN
/// line) and every handshake failed with "TLS: transport error: Error
/// parsing TLS certificate.", naming neither.
#[tokio::test]
async fn a_truncated_pem_file_is_said_to_be_one_naming_the_flag_and_file() {
    let pki = Pki::new("truncated");
    let cut = |file: &str| {
        let whole = std::fs::read(pki.path(file)).unwrap();
        let path = pki.path(&format!("cut-{file}"));
        std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
        path.display().to_string()
    };
    let (ca, cert, key) = (cut("ca.pem"), cut("client.pem"), cut("client.key"));
    let (whole_ca, whole_cert, whole_key) = (
        pki.arg("ca.pem"),
        pki.arg("client.pem"),
        pki.arg("client.key"),
    );
    let missing =
        |label: &str| format!("missing the \"-----END {label}-----\" line (a truncated file?)");
    for (files, says) in [
        (
            [&ca, &whole_cert, &whole_key],
            format!("--ca-cert {ca}: {}", missing("CERTIFICATE")),
        ),
        (
            [&whole_ca, &cert, &whole_key],
            format!("--client-cert {cert}: {}", missing("CERTIFICATE")),
        ),
        (
            [&whole_ca, &whole_cert, &key],
            format!("--client-key {key}: {}", missing("PRIVATE KEY")),
        ),
    ] {
        let [ca, cert, key] = files.map(String::as_str);
        let args = [
            "status",
            "--broker",
            "https://127.0.0.1:1",
            "--ca-cert",
            ca,
            "--client-cert",
            cert,
            "--client-key",
            key,
        ];
        let out = quotactl(&args, &[]).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(stderr(&out).trim_end(), format!("quotactl: TLS: {says}"));
    }
}
