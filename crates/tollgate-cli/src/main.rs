//! `tollgate`: the command line.
//!
//! - `tollgate batch FILE -o RESULTS --url URL [--rpm N] [--tpm N] ...` sends a JSONL file
//!   of requests at the provider's limits (see the `tollgate-batch` crate).
//! - `tollgate serve --config tollgate.toml [--listen ADDR] [--redis URL]` (or
//!   `tollgate serve --upstream URL [--rpm N] [--max-wait 60s]`, a pacing proxy that
//!   learns the limits and passes callers' keys through when it has none) runs the
//!   gateway (the `tollgate-gateway` crate); `tollgate hash-key KEY` prints the hash its
//!   config wants.
//! - `tollgate sim [--port 8089] [--rpm 600] [--tpm 90000] [--start-fill 1.0] ...` serves an
//!   OpenAI/Anthropic-compatible API that enforces those limits (the `tollgate-sim` crate).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tollgate_batch::{BatchConfig, OnRedisDown, Progress, RunFailureCause};
use tollgate_sim::{Sim, SimConfig};

/// The gateway allocates per request (headers, bodies, JSON); with mimalloc it spends
/// about 8 % less CPU per request than with the system allocator (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Keeps LLM API traffic inside its rate limits."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send every request of a JSONL file as fast as the rate limits allow; retry what
    /// fails; rerun the same command to resume after a crash.
    Batch(BatchArgs),
    /// Serve an OpenAI/Anthropic-compatible API that enforces rate limits, offline.
    Sim(SimArgs),
    /// Run the gateway: an OpenAI/Anthropic-compatible proxy with per-caller limits.
    Serve(ServeArgs),
    /// Print the SHA-256 of an API key, as a caller's `key_sha256` in tollgate.toml.
    HashKey {
        /// The caller's API key.
        key: String,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The configuration file (see docs/GATEWAY.md).
    #[arg(long, short = 'c')]
    config: Option<String>,
    /// Address to listen on (overrides the config's `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Share limits with other gateway instances through Redis (overrides `redis`).
    #[arg(long)]
    redis: Option<String>,
    /// Without a config file: a pacing proxy to this OpenAI-compatible base URL (as SDKs
    /// write it, `https://api.openai.com/v1` or without the `/v1`), open to anyone who can
    /// reach the listener. Its account's limits are `--rpm` / `--tpm`, or learned from
    /// its answers' rate-limit headers; requests wait their turn (`--max-wait`).
    #[arg(long)]
    upstream: Option<String>,
    /// With --upstream: the environment variable holding the upstream's API key. When
    /// it is unset, each caller's own key is passed through and paced as its own account.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    upstream_key_env: String,
    /// With --upstream: the upstream account's requests per minute [default: learned].
    #[arg(long)]
    rpm: Option<u64>,
    /// With --upstream: the upstream account's tokens per minute [default: learned].
    #[arg(long)]
    tpm: Option<u64>,
    /// With --upstream: the longest a request waits for its turn in the account's
    /// limits before it is refused with 429 (at most a day), and the time within which
    /// the upstream's 429s and 5xx are retried [default: 60s].
    #[arg(long, value_parser = duration)]
    max_wait: Option<Duration>,
    /// With --upstream: when the account's limits have no room, wait (queue, up to
    /// --max-wait) or reject at once with 429 (once the limits are known) [default: wait].
    #[arg(long, value_enum)]
    on_limit: Option<OnLimitArg>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnLimitArg {
    /// Queue (first come, first served) up to --max-wait.
    Wait,
    /// Answer 429 at once, with `retry-after`.
    Reject,
}

/// Parses `250ms`, `1.5s`, `6m0s`, or plain seconds.
fn duration(s: &str) -> Result<Duration, String> {
    tollgate::provider::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration (examples: 250ms, 1.5s, 2m, 10)"))
}

#[derive(Clone, Copy, ValueEnum)]
enum ProgressArg {
    /// A bar on a terminal, else plain lines.
    Auto,
    /// Always the bar.
    Bar,
    /// Plain lines every --progress-interval.
    Lines,
    /// Only the final summary.
    Off,
}

/// What `tollgate batch` does while Redis cannot be reached.
#[derive(Clone, Copy, clap::ValueEnum)]
enum OnRedisDownArg {
    /// Send nothing until Redis answers, then go on.
    Wait,
    /// Stop the run (exit 75); what was not answered is left for a rerun.
    Fail,
    /// Limit in this process alone, with the full limits, until Redis answers.
    Local,
}

#[derive(clap::Args)]
struct BatchArgs {
    /// The input: one request body per line (the cookbook's format, with an optional
    /// `metadata` field), or Batch API requests (`custom_id`, `method`, `url`, `body`).
    input: PathBuf,
    /// The results file; appended to, so a rerun resumes.
    #[arg(short, long)]
    output: PathBuf,
    /// The failures file [default: the results file's name with .failures.jsonl].
    #[arg(long)]
    failures: Option<PathBuf>,
    /// The endpoint, e.g. `https://api.openai.com/v1/chat/completions` (Batch API lines
    /// are sent to their own `url` path on this origin).
    #[arg(long)]
    url: String,
    /// Requests per minute [default: learned from the provider's headers].
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens per minute, counted as prompt + max_tokens × n [default: learned].
    #[arg(long)]
    tpm: Option<u64>,
    /// Requests waiting or in flight at once (1 to 10000).
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// Share the limits through this Redis with every process using the same account.
    #[arg(long)]
    redis: Option<String>,
    /// What to do while Redis cannot be reached (at the start too).
    #[arg(long, value_enum, default_value = "wait", requires = "redis")]
    on_redis_down: OnRedisDownArg,
    /// The environment variable holding the API key [default: OPENAI_API_KEY]. Given
    /// explicitly, it must be set and not empty; the default may be unset only for a URL
    /// on this machine (a simulator), with a warning.
    #[arg(long)]
    api_key_env: Option<String>,
    /// Name of the shared budget [default: a hash of the URL's origin and the API key].
    #[arg(long)]
    account: Option<String>,
    /// Attempts per line before it goes to the failures file.
    #[arg(long, default_value_t = 8)]
    max_attempts: u32,
    /// Time limit of one attempt.
    #[arg(long, value_parser = duration, default_value = "10m")]
    timeout: Duration,
    /// How much later a request may reach the provider than it leaves tollgate; the
    /// burst is lowered by what the limits refill in that time.
    #[arg(long, value_parser = duration, default_value = "250ms")]
    jitter: Duration,
    /// How progress is shown on stderr.
    #[arg(long, value_enum, default_value = "auto")]
    progress: ProgressArg,
    /// Interval of the plain progress lines (at least 100ms).
    #[arg(long, value_parser = duration, default_value = "10s")]
    progress_interval: Duration,
    /// Also write the final summary as JSON to this file.
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Stop the run (exit 3, nothing marked done) when the provider has answered
    /// nothing (connections refused, timed out or dropped) for this long.
    #[arg(long, value_parser = positive_duration, default_value = "2m")]
    give_up_after: Duration,
    /// Send again the lines in the failures file that failed for a reason that may have
    /// passed (timeouts, connection errors, 408, 409, 429 but "too large", 5xx, 401/403);
    /// never 400s, malformed lines or requests too large.
    #[arg(long)]
    retry_failures: bool,
}

/// Exit status of a run stopped by a failure of the whole run (key refused, out of
/// credit, provider unreachable): fix the cause and run the same command again.
const EXIT_RUN_FAILED: u8 = 3;

/// A duration above zero.
fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if d.is_zero() {
        return Err(format!(
            "must be more than 0, not {s:?} (examples: 30s, 2m)"
        ));
    }
    Ok(d)
}

/// Whether `url`'s host is this machine (where a simulator needs no key).
fn local_url(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host_port.split(':').next().unwrap_or(""),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[derive(clap::Args)]
struct SimArgs {
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8089)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Requests per minute per API key.
    #[arg(long, default_value_t = 600)]
    rpm: u64,
    /// Tokens per minute per API key (prompt + max_tokens × n at admission).
    #[arg(long, default_value_t = 90_000)]
    tpm: u64,
    /// Time to first token.
    #[arg(long, value_parser = duration, default_value = "50ms")]
    latency: Duration,
    /// Time per further generated token.
    #[arg(long, value_parser = duration, default_value = "0ms")]
    token_latency: Duration,
    /// Tokens generated per choice when the request allows that many.
    #[arg(long, default_value_t = 64)]
    output_tokens: u64,
    /// Share of requests answered 500 or 503 (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Share of responses delayed by --slow more.
    #[arg(long, default_value_t = 0.0)]
    slow_rate: f64,
    /// Extra delay of a slow response.
    #[arg(long, value_parser = duration, default_value = "10s")]
    slow: Duration,
    /// Share of admitted requests whose connection is dropped.
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Seed of the fault draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Accept only these API keys (comma-separated); others get 401.
    #[arg(long, value_delimiter = ',')]
    keys: Vec<String>,
    /// How full each key's buckets start (0.0 to 1.0): 0 reproduces a key whose budget
    /// an earlier run or another app has just spent.
    #[arg(long, default_value_t = 1.0)]
    start_fill: f64,
    /// Answer every request with a valid key 429 insufficient_quota (an account out of
    /// credit; 400 "credit balance is too low" on /v1/messages).
    #[arg(long)]
    out_of_credit: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // The batch runner says itself when Redis goes down and comes back (once
                // each, with what to do): the store's own lines would say it twice.
                let store = match cli.command {
                    Command::Batch(_) => ",tollgate::store::redis=off",
                    _ => "",
                };
                tracing_subscriber::EnvFilter::new(format!(
                    "warn,tollgate=info,tollgate_batch=info,tollgate_sim=info{store}"
                ))
            }),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Batch(args) => batch(args).await,
            Command::Sim(args) => sim(args).await,
            Command::Serve(args) => serve(args).await,
            Command::HashKey { key } => {
                println!("{}", tollgate_gateway::config::hash_key(&key));
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on the first Ctrl-C or SIGTERM; a second one exits at once.
async fn interrupted(what: &'static str) {
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    eprintln!("tollgate: {what}; press Ctrl-C again to quit at once");
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
}

async fn batch(args: BatchArgs) -> anyhow::Result<ExitCode> {
    let (key_var, explicit) = match &args.api_key_env {
        Some(var) => (var.clone(), true),
        None => ("OPENAI_API_KEY".to_owned(), false),
    };
    let api_key = std::env::var(&key_var)
        .ok()
        .filter(|k| !k.trim().is_empty());
    if api_key.is_none() {
        if explicit || !local_url(&args.url) {
            anyhow::bail!(
                "the environment variable {key_var} (--api-key-env) is unset or empty: set it to the provider's API key{}; nothing was sent",
                if explicit {
                    ""
                } else {
                    ", or name the variable holding it with --api-key-env VAR"
                }
            );
        }
        eprintln!(
            "tollgate batch: warning: {key_var} is unset or empty: sending without an API key (accepted because {} is on this machine)",
            args.url
        );
    }
    let mut config = BatchConfig::new(args.input, args.output, args.url);
    config.failures = args.failures;
    config.rpm = args.rpm;
    config.tpm = args.tpm;
    config.max_in_flight = args.max_in_flight;
    config.redis = args.redis;
    config.on_redis_down = match args.on_redis_down {
        OnRedisDownArg::Wait => OnRedisDown::Wait,
        OnRedisDownArg::Fail => OnRedisDown::Fail,
        OnRedisDownArg::Local => OnRedisDown::Local,
    };
    config.api_key = api_key;
    config.give_up_after = args.give_up_after;
    config.retry_failures = args.retry_failures;
    config.account = args.account;
    config.max_attempts = args.max_attempts;
    config.timeout = args.timeout;
    config.jitter = args.jitter;
    let interval = args.progress_interval.max(Duration::from_millis(100));
    config.progress = match args.progress {
        ProgressArg::Auto => Progress::Auto,
        ProgressArg::Bar => Progress::Bar,
        ProgressArg::Lines => Progress::Lines(interval),
        ProgressArg::Off => Progress::Off,
    };
    if let ProgressArg::Auto = args.progress
        && !std::io::IsTerminal::is_terminal(&std::io::stderr())
    {
        config.progress = Progress::Lines(interval);
    }
    let failures = config.failures_path();
    let summary = tollgate_batch::run(
        config,
        interrupted("stopping: no new requests; finishing the ones in flight"),
    )
    .await?;
    let s = &summary;
    eprintln!(
        "tollgate batch: {} lines: {} succeeded, {} failed ({} malformed), {} done before, {} left | {} requests sent, {} retries, {} 429s, {} 5xx, {} transport errors | {:.1}s",
        s.lines,
        s.succeeded,
        s.failed,
        s.malformed,
        s.already_done,
        s.unfinished,
        s.requests_sent,
        s.retries,
        s.rate_limited,
        s.server_errors,
        s.transport_errors,
        s.elapsed_secs,
    );
    if s.retried_failures > 0 {
        eprintln!(
            "tollgate batch: --retry-failures took {} lines back from {} to send again",
            s.retried_failures,
            failures.display()
        );
    }
    if s.failed > 0 {
        eprintln!("tollgate batch: failures are in {}", failures.display());
    }
    if let Some(path) = args.summary_json {
        let json = serde_json::to_string_pretty(&summary)?;
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(failure) = &summary.run_failure {
        let advice = match failure.cause {
            RunFailureCause::Auth => format!(
                "Check that --api-key-env {key_var} holds a valid key for this URL (and that the key may use this model and endpoint)"
            ),
            RunFailureCause::Credit => {
                "Add credit or raise the billing limit of the account".to_owned()
            }
            _ => format!(
                "Is the URL right, and is the provider up? (--give-up-after is {})",
                tollgate::provider::format_duration(args.give_up_after)
            ),
        };
        eprintln!(
            "tollgate batch: stopped: {failure}. {advice}. The lines not answered were not written anywhere: run the same command again to send them."
        );
        return Ok(ExitCode::from(EXIT_RUN_FAILED));
    }
    if let Some(reason) = &summary.stopped_because {
        eprintln!("tollgate batch: stopped: {reason}");
        // EX_TEMPFAIL: nothing is wrong, try again later.
        return Ok(ExitCode::from(75));
    }
    if summary.interrupted {
        eprintln!("tollgate batch: interrupted; run the same command again to finish");
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}

async fn sim(args: SimArgs) -> anyhow::Result<ExitCode> {
    let config = SimConfig {
        rpm: args.rpm,
        tpm: args.tpm,
        latency: args.latency,
        token_latency: args.token_latency,
        output_tokens: args.output_tokens,
        error_rate: args.error_rate,
        slow_rate: args.slow_rate,
        slow: args.slow,
        drop_rate: args.drop_rate,
        seed: args.seed,
        keys: args.keys,
        start_fill: args.start_fill,
        out_of_credit: args.out_of_credit,
        ..SimConfig::default()
    };
    let sim = Sim::start(SocketAddr::new(args.host, args.port), config).await?;
    let fill = if args.start_fill < 1.0 {
        format!(", each key starting {:.0} % full", args.start_fill * 100.0)
    } else {
        String::new()
    };
    eprintln!(
        "tollgate sim: listening on http://{} ({} requests/min, {} tokens/min per API key{fill}); stats at /stats",
        sim.addr(),
        args.rpm,
        args.tpm
    );
    tokio::select! {
        () = interrupted("stopping the simulator") => {}
    }
    let stats = sim.stats();
    sim.shutdown().await?;
    eprintln!("tollgate sim: {}", serde_json::to_string(&stats)?);
    Ok(ExitCode::SUCCESS)
}

/// The configuration `tollgate serve --upstream URL` runs with, and the start-up
/// line's description of it.
fn upstream_config(
    url: &str,
    args: &ServeArgs,
) -> anyhow::Result<(tollgate_gateway::Config, String)> {
    let max_wait = args.max_wait.unwrap_or(Duration::from_secs(60));
    let on_limit = args.on_limit.unwrap_or(OnLimitArg::Wait);
    if max_wait > Duration::from_secs(86_400) {
        anyhow::bail!("--max-wait is over a day; no caller waits that long for an answer");
    }
    // No callers: everyone is served as `anonymous` in the tier `default` below, and
    // sees the account's figures (the proxy's users share it knowingly).
    let mut src = format!(
        "open = true\nexpose_account_limits = true\n[upstreams.upstream]\nkind = \"openai-compatible\"\nurl = {url:?}\n"
    );
    let own_key = std::env::var(&args.upstream_key_env).is_ok_and(|v| !v.is_empty());
    if own_key {
        src.push_str(&format!("api_key_env = {:?}\n", args.upstream_key_env));
    } else {
        src.push_str("forward_caller_key = true\n");
    }
    // Each caller's own account behind its own key: every route is its own to use.
    let routes = if own_key {
        ""
    } else {
        "allow_routes = [\"/\"]\n"
    };
    if args.rpm.is_some() || args.tpm.is_some() {
        src.push_str("[upstreams.upstream.limits]\n");
        if let Some(n) = args.rpm {
            src.push_str(&format!("requests_per_minute = {n}\n"));
        }
        if let Some(n) = args.tpm {
            src.push_str(&format!("tokens_per_minute = {n}\n"));
        }
    }
    let policy = match on_limit {
        OnLimitArg::Wait => "wait",
        OnLimitArg::Reject => "reject",
    };
    src.push_str(&format!(
        "[tiers.default]\non_limit = \"{policy}\"\nmax_wait = \"{}ms\"\n{routes}",
        max_wait.as_millis()
    ));
    let config = tollgate_gateway::Config::parse(&src).context("--upstream")?;
    let key = if own_key {
        format!("the upstream key from ${}", args.upstream_key_env)
    } else {
        format!(
            "${} is unset: each caller's own key is passed through and paced as its own account",
            args.upstream_key_env
        )
    };
    let limits = match (args.rpm, args.tpm) {
        (None, None) => "limits learned from the upstream's rate-limit headers".to_string(),
        (rpm, tpm) => {
            let mut parts = Vec::new();
            if let Some(n) = rpm {
                parts.push(format!("{n} requests/min"));
            }
            if let Some(n) = tpm {
                parts.push(format!("{n} tokens/min"));
            }
            format!(
                "{} (lowered to what the upstream's headers say is left)",
                parts.join(", ")
            )
        }
    };
    let policy = match on_limit {
        OnLimitArg::Wait => format!(
            "requests wait their turn up to {}",
            tollgate::provider::format_duration(max_wait)
        ),
        OnLimitArg::Reject => "requests over the limits are refused with 429".to_string(),
    };
    Ok((
        config,
        format!("pacing proxy to {url}: {key}; {limits}; {policy}"),
    ))
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut mode = None;
    let mut config = match (&args.config, &args.upstream) {
        (Some(path), None) => {
            for (flag, given) in [
                ("--rpm", args.rpm.is_some()),
                ("--tpm", args.tpm.is_some()),
                ("--max-wait", args.max_wait.is_some()),
                ("--on-limit", args.on_limit.is_some()),
            ] {
                if given {
                    anyhow::bail!(
                        "{flag} is for --upstream; with a config file, set limits and on_limit in it (see docs/GATEWAY.md)"
                    );
                }
            }
            tollgate_gateway::Config::load(path)?
        }
        (None, Some(url)) => {
            let (config, described) = upstream_config(url, &args)?;
            mode = Some(described);
            config
        }
        (Some(_), Some(_)) => anyhow::bail!(
            "give either --config or --upstream: with a config file, put the upstream in it"
        ),
        (None, None) => anyhow::bail!(
            "give --config tollgate.toml (see docs/GATEWAY.md), or --upstream URL for a pacing proxy"
        ),
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(r) = args.redis {
        config.redis = Some(r);
    }
    let listen = config.listen.clone();
    let callers = config.callers.len();
    let gateway = tollgate_gateway::Gateway::new(config).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let mode = mode.unwrap_or_else(|| {
        if callers == 0 {
            "open: no callers configured".to_string()
        } else {
            format!("{callers} callers")
        }
    });
    eprintln!("tollgate serve: listening on http://{addr} ({mode})");
    gateway
        .serve(listener, interrupted("draining requests in flight"))
        .await?;
    eprintln!("tollgate serve: stopped");
    Ok(ExitCode::SUCCESS)
}
