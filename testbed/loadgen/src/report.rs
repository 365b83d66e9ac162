//! Printing results: the default run's table (one row per target and mode)
//! and the scale suite's table (one row per scenario, with the derived
//! memory and ratio figures and a check against the targets), each
//! optionally followed by the same rows as JSON lines.

use std::fmt::Write as _;

use crate::drive::Outcome;

/// Milliseconds with three decimals, from µs.
fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

/// `s` as a JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if u32::from(c) < 0x20 => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A finite number as JSON (`null` otherwise).
fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".into()
    }
}

/// One row of the default run: a target, what it measured, loadgen's RSS.
pub(crate) struct TargetRow {
    /// "broker" or "noop".
    pub(crate) target: &'static str,
    /// The run.
    pub(crate) outcome: Outcome,
    /// RSS of this process (load generator and in-process servers), KiB.
    pub(crate) rss_kib: u64,
}

/// Prints the default run's table and the broker/noop ratio per mode.
pub(crate) fn print_targets(rows: &[TargetRow]) {
    outln!("| target | mode | pairs/s | p50 ms | p99 ms | p999 ms | errors | RSS MiB |");
    outln!("|---|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let o = &r.outcome;
        outln!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {:.1} |",
            r.target,
            o.label,
            o.pairs_per_sec(),
            ms(o.quantile_us(0.50)),
            ms(o.quantile_us(0.99)),
            ms(o.quantile_us(0.999)),
            o.tally.errors,
            r.rss_kib as f64 / 1024.0,
        );
    }
    let mut labels: Vec<&String> = rows.iter().map(|r| &r.outcome.label).collect();
    labels.dedup();
    for label in labels {
        let find = |t: &str| {
            rows.iter()
                .find(|r| r.target == t && &r.outcome.label == label)
        };
        if let (Some(b), Some(n)) = (find("broker"), find("noop")) {
            outln!(
                "\nbroker/noop pairs/s, {label}: {:.2}",
                b.outcome.pairs_per_sec() / n.outcome.pairs_per_sec().max(f64::MIN_POSITIVE)
            );
        }
    }
}

/// Prints the default run's rows as JSON lines.
pub(crate) fn print_targets_json(rows: &[TargetRow]) {
    for r in rows {
        let o = &r.outcome;
        outln!(
            "{{\"target\":{},\"mode\":{},\"pairs_per_sec\":{:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{},\"rss_kib\":{}}}",
            json_str(r.target),
            json_str(&o.label),
            o.pairs_per_sec(),
            o.quantile_us(0.50),
            o.quantile_us(0.99),
            o.quantile_us(0.999),
            o.tally.errors,
            r.rss_kib,
        );
    }
}

/// The pair figures of a scale row.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Measured {
    /// Pairs per second.
    pub(crate) pairs_per_sec: f64,
    /// Latency quantiles, µs.
    pub(crate) p50_us: u64,
    /// 99th percentile, µs.
    pub(crate) p99_us: u64,
    /// 99.9th percentile, µs.
    pub(crate) p999_us: u64,
    /// Failed or refused pairs.
    pub(crate) errors: u64,
}

impl From<&Outcome> for Measured {
    fn from(o: &Outcome) -> Self {
        Measured {
            pairs_per_sec: o.pairs_per_sec(),
            p50_us: o.quantile_us(0.50),
            p99_us: o.quantile_us(0.99),
            p999_us: o.quantile_us(0.999),
            errors: o.tally.errors,
        }
    }
}

/// One row of the scale table.
#[derive(Debug)]
pub(crate) struct ScaleRow {
    /// Scenario name, e.g. "tenants-100".
    pub(crate) name: String,
    /// Its pairs, if it ran any (a failed row has none).
    pub(crate) measured: Option<Measured>,
    /// The broker's (or no-op server's) RSS at the end, KiB; `None` in
    /// process.
    pub(crate) rss_kib: Option<u64>,
    /// The derived figure in words (memory per item, ratios, startup).
    pub(crate) derived: String,
    /// The derived figures as numbers, for JSON.
    pub(crate) figures: Vec<(&'static str, f64)>,
}

impl ScaleRow {
    /// A row for `outcome`.
    pub(crate) fn new(name: impl Into<String>, outcome: &Outcome, rss_kib: Option<u64>) -> Self {
        ScaleRow {
            name: name.into(),
            measured: Some(outcome.into()),
            rss_kib,
            derived: String::new(),
            figures: Vec::new(),
        }
    }

    /// A row whose run failed.
    pub(crate) fn failed(name: impl Into<String>, why: &str) -> Self {
        ScaleRow {
            name: name.into(),
            measured: None,
            rss_kib: None,
            derived: format!("failed: {why}"),
            figures: Vec::new(),
        }
    }

    /// Appends to the derived text ("; "-separated).
    pub(crate) fn note(mut self, text: impl AsRef<str>) -> Self {
        if !self.derived.is_empty() {
            self.derived.push_str("; ");
        }
        self.derived.push_str(text.as_ref());
        self
    }

    /// Adds a derived number (JSON only).
    pub(crate) fn figure(mut self, key: &'static str, value: f64) -> Self {
        self.figures.push((key, value));
        self
    }

    /// A figure by key.
    pub(crate) fn get(&self, key: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }
}

/// Prints the scale table.
pub(crate) fn print_scale(rows: &[ScaleRow]) {
    outln!(
        "| scenario | pairs/s | p50 ms | p99 ms | p999 ms | errors | server RSS MiB | derived |"
    );
    outln!("|---|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let (rate, p50, p99, p999, errors) = match &r.measured {
            Some(m) => (
                format!("{:.0}", m.pairs_per_sec),
                ms(m.p50_us),
                ms(m.p99_us),
                ms(m.p999_us),
                m.errors.to_string(),
            ),
            None => Default::default(),
        };
        let rss = r.rss_kib.map_or_else(
            || "n/a".to_string(),
            |k| format!("{:.1}", k as f64 / 1024.0),
        );
        outln!(
            "| {} | {rate} | {p50} | {p99} | {p999} | {errors} | {rss} | {} |",
            r.name,
            r.derived
        );
    }
}

/// Prints the scale rows as JSON lines.
pub(crate) fn print_scale_json(rows: &[ScaleRow]) {
    for r in rows {
        let mut line = format!("{{\"scenario\":{}", json_str(&r.name));
        if let Some(m) = &r.measured {
            let _ = write!(
                line,
                ",\"pairs_per_sec\":{},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{}",
                json_num(m.pairs_per_sec),
                m.p50_us,
                m.p99_us,
                m.p999_us,
                m.errors
            );
        }
        match r.rss_kib {
            Some(k) => {
                let _ = write!(line, ",\"server_rss_kib\":{k}");
            }
            None => line.push_str(",\"server_rss_kib\":null"),
        }
        let _ = write!(line, ",\"derived\":{}", json_str(&r.derived));
        for (key, value) in &r.figures {
            let _ = write!(line, ",{}:{}", json_str(key), json_num(*value));
        }
        line.push('}');
        outln!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
        assert_eq!(json_num(f64::NAN), "null");
        assert_eq!(json_num(1.5), "1.500");
    }
}
