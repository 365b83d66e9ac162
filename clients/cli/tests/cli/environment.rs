//! The environment variables quotactl reads: one set but empty is unset,
//! a bad value is named by its variable, and the tenant, optional in the
//! usage, is needed from `--tenant` or `QUOTA_BROKER_TENANT`, which alone
//! gives it.

use super::{output, quotactl, stderr_line, Broker, ADMIN};
use serde_json::Value;
use tokio::process::Command;

/// An environment variable set but empty (or blanks) is unset, for every
/// one quotactl reads: `QUOTA_BROKER_URL=` is the default broker, as
/// `QUOTA_BROKER_TOKEN=` is no token and `QUOTA_BROKER_TENANT=` no tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_environment_variables_are_unset() {
    let b = Broker::start().await;
    let blank = |c: &mut Command| {
        for var in [
            "QUOTA_BROKER_TOKEN",
            "QUOTA_BROKER_TENANT",
            "QUOTA_BROKER_TIMEOUT",
            "QUOTA_BROKER_CA_CERT",
            "QUOTA_BROKER_CLIENT_CERT",
            "QUOTA_BROKER_CLIENT_KEY",
            "QUOTA_BROKER_TLS_SERVER_NAME",
        ] {
            c.env(var, "");
        }
        c.env("QUOTA_BROKER_URL", " ");
    };
    // Every tenant (no tenant), no TLS options, the default timeout.
    let mut c = b.cmd(Some(ADMIN), &["status", "--json"]);
    blank(&mut c);
    let out = output(c).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The default broker (none is asked: the tenant is missing first).
    let mut c = quotactl(&["class", "list"]);
    blank(&mut c);
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr_line(&out),
        "quotactl: class list needs a tenant: give --tenant <T> or set QUOTA_BROKER_TENANT"
    );
    b.stop().await;
}

/// A bad value from an environment variable is said with its name (clap
/// names only the flag it stands for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_environment_value_is_named_by_its_variable() {
    for args in [&["status"][..], &["--timeout", "5", "status"]] {
        let mut c = quotactl(args);
        c.env("QUOTA_BROKER_TIMEOUT", "abc");
        let out = output(c).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            stderr_line(&out),
            "quotactl: invalid value 'abc' for --timeout <SECS> from the environment variable \
             QUOTA_BROKER_TIMEOUT: invalid digit found in string; fix or unset \
             QUOTA_BROKER_TIMEOUT",
            "{args:?}"
        );
    }
    let mut c = quotactl(&["status"]);
    c.env("QUOTA_BROKER_URL", format!("ftp://{}", "x".repeat(5_000)));
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_line(&out);
    assert!(
        err.contains(
            "… (5006 bytes)' for --broker <URL[,URL...]> from the environment variable \
                      QUOTA_BROKER_URL: expected an http:// or https:// URL"
        ) && err.len() < 400,
        "{err}"
    );
    // Given on the command line: clap's own words, naming the flag.
    let mut c = quotactl(&["--timeout", "abc", "status"]);
    c.env("QUOTA_BROKER_TIMEOUT", "7");
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'abc' for '--timeout <SECS>'")
            && !err.contains("QUOTA_BROKER_TIMEOUT"),
        "{err}"
    );
}

/// Every command for one tenant, with its other required arguments.
const ONE_TENANT: [&[&str]; 8] = [
    &["class", "list"],
    &[
        "class",
        "set",
        "x",
        "--order",
        "1",
        "--weight",
        "1",
        "--reserve",
        "0",
        "--default-max-wait-ms",
        "0",
    ],
    // Reads the class first (ListPriorityClasses).
    &["class", "set", "x", "--weight", "2"],
    &["class", "reset", "x"],
    &["bucket", "set-limit", "org", "--burst", "4"],
    &["pause", "org"],
    &["resume", "org"],
    &["clear", "org"],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_is_optional_in_usage_and_needed_by_flag_or_environment() {
    for command in ONE_TENANT {
        // The usage does not demand the flag, and the help still shows it
        // with its environment variable.
        let out = output(quotactl(&[command[0], command[1], "--help"])).await;
        assert!(out.status.success(), "{command:?}");
        let help = String::from_utf8(out.stdout).unwrap();
        let usage = help.lines().find(|l| l.starts_with("Usage: ")).unwrap();
        assert!(!usage.contains("--tenant"), "{command:?}: {usage}");
        assert!(
            help.contains("--tenant <T>") && help.contains("QUOTA_BROKER_TENANT"),
            "{command:?}: {help}"
        );
        // Neither the flag nor the variable: a usage error naming both,
        // before any broker is asked (none listens at port 1).
        let mut args = vec!["--broker", "127.0.0.1:1"];
        args.extend_from_slice(command);
        let out = output(quotactl(&args)).await;
        assert_eq!(out.status.code(), Some(2), "{command:?}");
        let err = stderr_line(&out);
        assert!(err.starts_with("quotactl: "), "{err}");
        assert!(
            err.contains("--tenant") && err.contains("QUOTA_BROKER_TENANT"),
            "{command:?}: {err}"
        );
    }
    // The commands over every tenant take none.
    for command in ["status", "watch"] {
        let out = output(quotactl(&[command, "--help"])).await;
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(help.contains(&format!("Usage: quotactl {command} [OPTIONS]\n")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_alone_gives_the_tenant() {
    let b = Broker::start().await;
    let run = |args: &[&str]| {
        let mut c = b.cmd(Some(ADMIN), args);
        c.env("QUOTA_BROKER_TENANT", "t");
        output(c)
    };
    for command in ONE_TENANT {
        let out = run(command).await;
        assert!(
            out.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(&["class", "list", "--json"]).await;
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["tenant"], "t");
    b.stop().await;
}
