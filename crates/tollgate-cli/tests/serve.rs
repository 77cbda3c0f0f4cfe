//! `tollgate serve` on the command line: the start-up line says which mode it runs in,
//! and flags that only `--upstream` reads are refused next to a config file instead of
//! being ignored.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// The first line `tollgate serve` prints with `args`, and the process, still running.
fn start_line(args: &[&str], env_key: Option<&str>) -> String {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("OPENAI_API_KEY")
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    if let Some(key) = env_key {
        cmd.env("OPENAI_API_KEY", key);
    }
    let mut child = cmd.spawn().expect("start tollgate serve");
    let stderr = child.stderr.take().expect("stderr");
    let line = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("listening on") || l.contains("error"))
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    line
}

#[test]
fn the_start_up_line_says_whose_key_goes_upstream_and_what_paces() {
    let passed = start_line(&["--upstream", "http://127.0.0.1:9/v1"], None);
    assert!(
        passed.contains("pacing proxy to http://127.0.0.1:9/v1")
            && passed.contains("$OPENAI_API_KEY is unset: each caller's own key is passed through")
            && passed.contains("limits learned from the upstream's rate-limit headers")
            && passed.contains("requests wait their turn up to 1m0s"),
        "{passed}"
    );
    let own = start_line(
        &[
            "--upstream",
            "http://127.0.0.1:9",
            "--rpm",
            "120",
            "--on-limit",
            "reject",
        ],
        Some("sk-test"),
    );
    assert!(
        own.contains("the upstream key from $OPENAI_API_KEY")
            && own.contains("120 requests/min")
            && own.contains("refused with 429"),
        "{own}"
    );
}

#[test]
fn upstream_flags_next_to_a_config_file_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        "[upstreams.u]\nkind = \"openai\"\nurl = \"http://127.0.0.1:9\"\n",
    )
    .expect("write config");
    let path = config.to_str().expect("utf-8 path");
    for flag in [["--rpm", "5"], ["--max-wait", "5s"], ["--on-limit", "wait"]] {
        let out = Command::new(BIN)
            .args(["serve", "--config", path])
            .args(flag)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag:?}");
        assert!(
            err.contains(&format!("{} is for --upstream", flag[0])),
            "{flag:?}: {err}"
        );
    }
    let out = Command::new(BIN)
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:9",
            "--max-wait",
            "2d",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--max-wait is over a day"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
