//! The `[[auth.tokens]]`: an invalid token is not called missing, a token
//! listed twice is a problem, and a token's name is short.

use super::super::*;

#[test]
fn invalid_tokens_are_not_called_missing() {
    let err = Settings::from_toml(
        "[server]\nlisten = \"0.0.0.0:1\"\n[[auth.tokens]]\nname = \"a\"\n\
         sha256 = \"zz\"\nrole = \"client\"\ntenants = [\"t\"]\n\
         [[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
         routes = [\"* /**\"]\nmax_in_flight = 1\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("auth.tokens[0]"), "{err}");
    assert!(!err.contains("no [[auth.tokens]] are configured"), "{err}");
}

#[test]
fn a_token_listed_twice_is_a_problem_and_a_name_is_short() {
    let token = |name: &str, role: &str, tenants: &str| {
        format!(
            "[[auth.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"{role}\"\n\
             tenants = {tenants}\n",
            crate::auth::hash_token("s3cret")
        )
    };
    let tenants = "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
                   routes = [\"* /**\"]\nmax_in_flight = 1\n";
    let twice = format!(
        "{}{}{tenants}",
        token("ops", "admin", "[\"*\"]"),
        token("wallboard", "client", "[\"t\"]")
    );
    let err = Settings::from_toml(&twice).unwrap_err();
    assert_eq!(
        err.problems,
        [
            "auth.tokens[1] (\"wallboard\"): the same sha256 as auth.tokens[0]; a token has one \
          entry (two holders need two tokens)"
        ]
    );
    let long = "n".repeat(3_000);
    let err = Settings::from_toml(&format!("{}{tenants}", token(&long, "client", "[\"t\"]")))
        .unwrap_err();
    let all = err.to_string();
    assert!(all.contains("name is 3000 characters; at most 64"), "{all}");
    assert!(all.len() < 500, "{all}");
    // One name, two tokens: a rotation.
    let rotation = format!(
        "{}[[auth.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nrole = \"admin\"\n\
         tenants = [\"*\"]\n{tenants}",
        token("ops", "admin", "[\"*\"]"),
        crate::auth::hash_token("n3w-s3cret")
    );
    assert!(Settings::from_toml(&rotation).is_ok());
}
