//! The Python snippet in docs/protocol.md ("Host names in subjects"), run by the real `python3`,
//! gives the same token as [`Target::token`] for every host name, and decodes it back.

use std::io::Write;
use std::process::{Command, Stdio};

use homelab_deploy_protocol::Target;
use proptest::prelude::*;

/// The code between the `token-snippet-start` and `-end` markers of docs/protocol.md.
fn snippet() -> String {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol.md");
    let text = std::fs::read_to_string(&docs).expect("docs/protocol.md");
    let start = text.find("# token-snippet-start").expect("start marker");
    let end = text.find("# token-snippet-end").expect("end marker");
    text[start..end].to_owned()
}

/// (token, decoded name) that Python makes of each name.
fn python_tokens(names: &[String]) -> Vec<(String, String)> {
    let program = format!(
        "{}\nimport json, sys\nfor name in json.load(sys.stdin):\n    token = host_token(name)\n    \
         print(json.dumps([token, name if token == '%61ll' else host_name(token)]))\n",
        snippet()
    );
    let mut child = Command::new("python3")
        .args(["-c", &program])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is installed");
    let input = serde_json::to_vec(names).expect("names as JSON");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&input)
        .expect("write names");
    let output = child.wait_with_output().expect("python3 ends");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON pair"))
        .collect()
}

fn agrees(names: Vec<String>) {
    let python = python_tokens(&names);
    assert_eq!(python.len(), names.len());
    for (name, (token, decoded)) in names.iter().zip(python) {
        let target = Target::host(name).expect("valid host name");
        assert_eq!(token, target.token(), "{name:?}");
        assert_eq!(&decoded, name);
        assert_eq!(Target::from_token(&token), Ok(target));
    }
}

#[test]
fn documented_python_snippet_matches_the_rust_encoding() {
    agrees(
        [
            "web",
            "web.example.org",
            "all",
            "All",
            "50%",
            "%2E",
            "a~b",
            "a\"b",
            "a\\b",
            "${x}",
            "../../x",
            "new\nline",
            "café",
            "名前",
            "a b*>",
            "-_",
        ]
        .map(str::to_owned)
        .to_vec(),
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    /// Random names, 32 at a time through one python3 process.
    #[test]
    fn random_names_agree_with_python(names in proptest::collection::vec("\\PC{1,24}", 32)) {
        agrees(names);
    }
}
