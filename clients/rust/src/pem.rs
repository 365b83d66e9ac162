//! The structure of a PEM file, checked before tonic reads it: tonic parses
//! PEM (with rustls-pki-types) only when it connects, and then says "Error
//! parsing TLS certificate." naming neither the file nor what is wrong. The
//! rules are pki-types': a block opens with a line `-----BEGIN LABEL-----`
//! and closes at the first line that starts `-----END LABEL-----`, and a
//! certificate's or key's lines between are base64.

/// Labels whose blocks tonic decodes (the others it skips): a certificate
/// and the private keys it takes.
const DECODED: [&str; 4] = [
    "CERTIFICATE",
    "PRIVATE KEY",
    "RSA PRIVATE KEY",
    "EC PRIVATE KEY",
];

/// Most characters of a label or line of the file shown (it is input).
const SHOWN_CHARS: usize = 64;

/// One block of a PEM file: its label.
#[derive(Debug)]
pub(crate) struct Block {
    pub(crate) label: String,
}

/// The blocks of `pem`, or what is wrong with them in words: a block with
/// no END line (a truncated file), a BEGIN line that does not end in five
/// dashes, a certificate or key whose lines are not base64.
pub(crate) fn blocks(pem: &[u8]) -> Result<Vec<Block>, String> {
    let text = String::from_utf8_lossy(pem);
    let mut found = Vec::new();
    let mut open: Option<&str> = None;
    // The open block has a line that is not base64: said once it closes
    // (a truncated file's last line is cut anywhere).
    let mut damaged = false;
    for line in text.split(['\n', '\r']) {
        if let Some(rest) = line.strip_prefix("-----BEGIN ") {
            let label = rest
                .trim_end_matches(' ')
                .strip_suffix("-----")
                .filter(|l| !l.ends_with('-'))
                .ok_or_else(|| {
                    format!(
                        "a -----BEGIN line that does not end in five dashes: {:?}",
                        shown(line)
                    )
                })?;
            (open, damaged) = (Some(label), false);
        } else if let Some(label) = open {
            let ends = line
                .strip_prefix("-----END ")
                .and_then(|rest| rest.strip_prefix(label))
                .is_some_and(|rest| rest.starts_with("-----"));
            if ends && damaged && DECODED.contains(&label) {
                return Err(format!(
                    "the lines of its {} block are not base64 (a damaged file?)",
                    shown(label)
                ));
            } else if ends {
                found.push(Block {
                    label: label.to_owned(),
                });
                open = None;
            } else if !line.bytes().all(|b| {
                b.is_ascii_alphanumeric() || b"+/=".contains(&b) || b.is_ascii_whitespace()
            }) {
                damaged = true;
            }
        }
    }
    match open {
        Some(label) => Err(format!(
            "missing the \"-----END {}-----\" line (a truncated file?)",
            shown(label)
        )),
        None => Ok(found),
    }
}

/// A piece of the file as a message shows it: cut after [`SHOWN_CHARS`].
fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}…", &text[..end]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\nAAAA==\n\
                        -----END CERTIFICATE-----\n";

    #[test]
    fn whole_blocks_are_listed_and_a_truncated_one_says_its_end_line_is_missing() {
        let two = format!(
            "junk before\r\n{CERT}{}",
            CERT.replace("CERTIFICATE", "PRIVATE KEY")
        );
        let labels: Vec<String> = blocks(two.as_bytes())
            .unwrap()
            .into_iter()
            .map(|b| b.label)
            .collect();
        assert_eq!(labels, ["CERTIFICATE", "PRIVATE KEY"]);
        assert!(blocks(b"no PEM here").unwrap().is_empty());
        for cut in [CERT.len() / 2, CERT.len() - 10, CERT.len() - 3] {
            assert_eq!(
                blocks(&CERT.as_bytes()[..cut]).err().as_deref(),
                Some("missing the \"-----END CERTIFICATE-----\" line (a truncated file?)"),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_broken_begin_line_or_damaged_base64_is_said_clipped() {
        let long = format!("-----BEGIN CERTIFICATE{}\n", "x".repeat(10_000));
        let e = blocks(long.as_bytes()).unwrap_err();
        assert!(
            e.starts_with("a -----BEGIN line that does not end in five dashes") && e.len() < 200,
            "{e}"
        );
        let damaged = CERT.replace("AAAA==", "AA!A==");
        assert_eq!(
            blocks(damaged.as_bytes()).err().as_deref(),
            Some("the lines of its CERTIFICATE block are not base64 (a damaged file?)")
        );
        // A block tonic does not decode is not checked for base64.
        let other = CERT
            .replace("CERTIFICATE", "SOMETHING ELSE")
            .replace("AAAA", "A:A");
        assert_eq!(blocks(other.as_bytes()).unwrap().len(), 1);
    }
}
