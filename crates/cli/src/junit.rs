//! `--junit FILE`: the result of a build as a JUnit XML report, one test case per host, so CI
//! systems show per-host results.

use homelab_deploy_protocol::{Event, EventBody, HostStatus};

/// The JUnit XML of a `finished` event; `None` for any other event.
pub fn report(finished: &Event) -> Option<String> {
    let EventBody::Finished {
        repo,
        target,
        hosts,
        error,
        duration_ms,
        ..
    } = &finished.body
    else {
        return None;
    };
    let suite = format!("{repo} {target}");
    let seconds = |ms: u64| format!("{:.3}", ms as f64 / 1000.0);
    let mut cases = String::new();
    let (mut failures, mut skipped) = (0, 0);
    for host in hosts {
        cases.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{}\">\n",
            escape(repo),
            attribute(&host.name),
            seconds(host.duration_ms)
        ));
        match host.status {
            HostStatus::Built | HostStatus::Cached => {}
            HostStatus::Cancelled => {
                skipped += 1;
                cases.push_str("      <skipped message=\"cancelled\"/>\n");
            }
            failed @ (HostStatus::BuildFailed | HostStatus::EvalFailed | HostStatus::TimedOut) => {
                failures += 1;
                cases.push_str(&format!(
                    "      <failure type=\"{0}\" message=\"{0}\">{1}</failure>\n",
                    failed.as_str(),
                    escape(host.error.as_deref().unwrap_or(""))
                ));
            }
        }
        let closure_diff = host
            .closure_diff
            .as_ref()
            .map(|diff| format!("\nclosure_diff: {}", escape(&diff.lines().join("\n"))))
            .unwrap_or_default();
        cases.push_str(&format!(
            "      <system-out>status: {}{}{closure_diff}</system-out>\n    </testcase>\n",
            host.status.as_str(),
            host.out_path
                .as_deref()
                .map(|out| format!("\nout_path: {}", escape(out)))
                .unwrap_or_default()
        ));
    }
    let mut tests = hosts.len();
    if let Some(error) = error.as_deref().filter(|_| hosts.is_empty()) {
        // Refused before any host: one failing case says why.
        tests = 1;
        failures = 1;
        cases.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"request\" time=\"{}\">\n      <failure type=\"refused\" message=\"refused\">{}</failure>\n    </testcase>\n",
            escape(repo),
            seconds(*duration_ms),
            escape(error)
        ));
    }
    let header = format!(
        "tests=\"{tests}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{}\"",
        seconds(*duration_ms)
    );
    Some(format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"homelab-deploy\" {header}>\n  <testsuite name=\"{}\" {header} timestamp=\"{}\">\n{cases}  </testsuite>\n</testsuites>\n",
        attribute(&suite),
        finished.time.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
    ))
}

/// Escapes text for an XML attribute value: as [`escape`], with newline, carriage return and tab
/// as character references, which a parser keeps (it turns raw ones into spaces), so a host name
/// reads back exactly.
fn attribute(text: &str) -> String {
    escape(text)
        .replace('\n', "&#10;")
        .replace('\r', "&#13;")
        .replace('\t', "&#9;")
}

/// Escapes text for XML, dropping characters XML 1.0 cannot hold (e.g. escape codes in logs).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' | '\t' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use homelab_deploy_protocol::{BuildStatus, HostResult};

    fn host(name: &str, status: HostStatus, error: Option<&str>) -> HostResult {
        HostResult {
            name: name.into(),
            status,
            out_path: status.is_success().then(|| format!("/nix/store/x-{name}")),
            duration_ms: 1500,
            error: error.map(str::to_owned),
            pushed: None,
            push_error: None,
            closure_diff: None,
        }
    }

    #[test]
    fn one_case_per_host_with_failures_and_escaping() {
        let event = Event {
            id: "REQUEST01".into(),
            seq: 9,
            time: time::OffsetDateTime::UNIX_EPOCH,
            body: EventBody::Finished {
                status: BuildStatus::Failed,
                repo: "demo".into(),
                target: "all".into(),
                rev: None,
                hosts: vec![
                    host("web", HostStatus::Built, None),
                    host(
                        "db",
                        HostStatus::BuildFailed,
                        Some("error: <disk> & \u{1b}[31mfull"),
                    ),
                    host("mail", HostStatus::Cancelled, None),
                ],
                error: None,
                code: None,
                queued_at: None,
                builder: None,
                cancelled_by: None,
                cancelled_by_key: None,
                requested_by_key: None,
                duration_ms: 4000,
            },
        };
        let xml = report(&event).expect("finished event");
        assert!(
            xml.contains("tests=\"3\" failures=\"1\" errors=\"0\" skipped=\"1\""),
            "{xml}"
        );
        assert!(xml.contains("name=\"db\" time=\"1.500\""), "{xml}");
        assert!(xml.contains("error: &lt;disk&gt; &amp; [31mfull"), "{xml}");
        assert!(xml.contains("<skipped message=\"cancelled\"/>"), "{xml}");
    }
}
