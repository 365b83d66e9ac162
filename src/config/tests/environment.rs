//! The environment over the file: a key of the default set by its
//! variable, a list set comma-separated, a number out of range said to be,
//! a problem named with the variable that set it, and variables meant for
//! the config but not read named.

use super::super::*;

#[test]
fn env_overrides_a_key_of_the_default() {
    let env = [(
        "QUOTA_BROKER__SERVER__LISTEN".to_owned(),
        "127.0.0.1:6000".to_owned(),
    )];
    let s = Settings::load(None, env).unwrap();
    assert_eq!(s.server.listen.port(), 6000);
    let env = [(
        "QUOTA_BROKER__SERVER__MAX_WAIT_MS".to_owned(),
        "1500".to_owned(),
    )];
    let s = Settings::load(None, env).unwrap();
    assert_eq!(s.server.max_wait, Duration::from_millis(1500));
    // A string key's value that looks like a number is read as written.
    let env = [
        (
            "QUOTA_BROKER__SERVER__STATE_DIR".to_owned(),
            "0070".to_owned(),
        ),
        (
            "QUOTA_BROKER__SERVER__LOG_FORMAT".to_owned(),
            "true".to_owned(),
        ),
    ];
    let err = Settings::load(None, env).unwrap_err().to_string();
    assert!(!err.contains("state_dir"), "{err}");
    assert!(err.contains("log_format"), "{err}");
    let env = [(
        "QUOTA_BROKER__SERVER__STATE_DIR".to_owned(),
        "0070".to_owned(),
    )];
    let s = Settings::load(None, env).unwrap();
    assert_eq!(s.server.state_dir, Some(std::path::PathBuf::from("0070")));
}

/// A list key is set from the environment comma-separated, and a
/// number no key can hold is said to be out of range, not of the wrong
/// type.
#[test]
fn the_environment_sets_lists_comma_separated_and_says_when_a_number_is_out_of_range() {
    let env = |extra: &[(&str, &str)]| {
        let mut env = vec![
            (
                "QUOTA_BROKER__CLUSTER__ETCD",
                " http://127.0.0.1:2379, http://127.0.0.2:2379 ,",
            ),
            ("QUOTA_BROKER__CLUSTER__NODE", "b1"),
            ("QUOTA_BROKER__CLUSTER__ADVERTISE", "http://127.0.0.1:50051"),
        ];
        env.extend_from_slice(extra);
        env.into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect::<Vec<_>>()
    };
    let c = Settings::load(None, env(&[])).unwrap().cluster.unwrap();
    assert_eq!(c.etcd, ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]);
    let one = [("QUOTA_BROKER__CLUSTER__ETCD", "https://etcd.internal:2379")];
    let err = Settings::load(None, env(&one)).unwrap_err().to_string();
    // Read as a list of one: what is missing is its CA, not a sequence.
    assert!(!err.contains("sequence"), "{err}");
    assert!(
        err.contains("set cluster.etcd_ca")
            && err.contains("(set by the environment variable QUOTA_BROKER__CLUSTER__ETCD)"),
        "{err}"
    );
    let none = [("QUOTA_BROKER__CLUSTER__ETCD", "")];
    let err = Settings::load(None, env(&none)).unwrap_err().to_string();
    assert!(
        err.contains("cluster.etcd is empty")
            && err.contains("(set by the environment variable QUOTA_BROKER__CLUSTER__ETCD)"),
        "{err}"
    );
    let huge = [(
        "QUOTA_BROKER__CLUSTER__LEASE_TTL_MS",
        "99999999999999999999",
    )];
    let err = Settings::load(None, env(&huge)).unwrap_err();
    assert_eq!(
        err.problems,
        [
            "cluster.lease_ttl_ms: 99999999999999999999 is out of range for this key (it takes \
          whole numbers from 0 to 9223372036854775807) (set by the environment variable \
          QUOTA_BROKER__CLUSTER__LEASE_TTL_MS)"
        ]
    );
    let below = [(
        "QUOTA_BROKER__CLUSTER__LEASE_TTL_MS",
        "-99999999999999999999",
    )];
    let err = Settings::load(None, env(&below)).unwrap_err().to_string();
    assert!(
        err.contains("-99999999999999999999 is out of range"),
        "{err}"
    );
    // A fraction is of the wrong type still, and a long value is clipped.
    let fraction = [("QUOTA_BROKER__CLUSTER__LEASE_TTL_MS", "2.5")];
    let err = Settings::load(None, env(&fraction))
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid type: floating point"), "{err}");
    let long = "9".repeat(5_000);
    let err = Settings::load(None, env(&[("QUOTA_BROKER__CLUSTER__LEASE_TTL_MS", &long)]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("out of range") && err.len() < 600, "{err}");
    // The same from a file: a number past the key's type.
    let err = Settings::from_toml("[server]\nmax_connections = 99999999999\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "server.max_connections: 99999999999 is out of range for this key (it takes whole \
             numbers from 0 to 4294967295)"
        ),
        "{err}"
    );
}

#[test]
fn a_problem_set_by_the_environment_names_its_variable() {
    let env = [
        ("QUOTA_BROKER__SERVER__LISTN".to_owned(), "x".to_owned()),
        (
            "QUOTA_BROKER__SERVER__MAX_WAIT_MS".to_owned(),
            "abc".to_owned(),
        ),
    ];
    let err = Settings::load(None, env).unwrap_err().to_string();
    assert!(
        err.contains("(set by the environment variable QUOTA_BROKER__SERVER__LISTN)"),
        "{err}"
    );
    assert!(
        err.contains("(set by the environment variable QUOTA_BROKER__SERVER__MAX_WAIT_MS)"),
        "{err}"
    );
    // A section that does not exist, named alone.
    let env = [("QUOTA_BROKER__SERVR__LISTEN".to_owned(), "x".to_owned())];
    let err = Settings::load(None, env).unwrap_err().to_string();
    assert!(
        err.contains("servr")
            && err.contains("(set by the environment variable QUOTA_BROKER__SERVR__LISTEN)"),
        "{err}"
    );
    // A semantic problem too.
    let env = [("QUOTA_BROKER__SERVER__LISTEN".to_owned(), "nope".to_owned())];
    let err = Settings::load(None, env).unwrap_err().to_string();
    assert!(
        err.contains("(set by the environment variable QUOTA_BROKER__SERVER__LISTEN)"),
        "{err}"
    );
}

#[test]
fn env_vars_meant_for_the_config_but_not_read_are_named() {
    let env = [
        ("QUOTA_BROKER_SERVER__LISTEN", "nope"),
        ("QUOTA_BROKER__SERVER__LISTEN", "127.0.0.1:1"),
        ("QUOTA_BROKER_URL", "http://127.0.0.1:1"),
        ("QUOTA_BROKER_TOKEN", "t"),
        ("QUOTA_BROKERX", "x"),
        ("PATH", "/bin"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    assert_eq!(unread_env_vars(env), ["QUOTA_BROKER_SERVER__LISTEN"]);
}
