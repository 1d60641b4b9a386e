//! A tiny HTTP app for trying out and testing `drainit`.
//!
//! Run it behind drainit:
//!
//! ```text
//! drainit -- cargo run --example demo_app -- --listen 0.0.0.0:8080
//! ```
//!
//! Every line it prints to stdout is flushed immediately, so tests can follow
//! it through a pipe:
//!
//! ```text
//! demo-app: listening on <ADDR>
//! demo-app: grandchild pid <PID>          (with --spawn-grandchild)
//! demo-app: closed the listener           (with --close-listener-after)
//! demo-app: signal <NAME> at <UNIX_MILLIS> (NAME without "SIG", e.g. TERM)
//! demo-app: last request at <UNIX_MILLIS>  (on exit, if it served any)
//! demo-app: exiting with <CODE>
//! ```
//!
//! `GET /` answers `hello from <name> (pid <pid>)`, `GET /healthz` answers
//! `ok`, `GET /panic` panics in the connection's task (the app goes on serving),
//! anything else is a 404.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use futures_util::stream::StreamExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use signal_hook::consts::signal::{
    SIGALRM, SIGCONT, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTSTP, SIGTTIN, SIGTTOU, SIGUSR1,
    SIGUSR2, SIGWINCH,
};
use signal_hook_tokio::Signals;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Signals that are caught and reported on stdout.
const REPORTED: [i32; 12] = [
    SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH, SIGCONT, SIGALRM, SIGTSTP,
    SIGTTIN, SIGTTOU,
];

/// Demo HTTP app for drainit: reports every signal it gets on stdout.
#[derive(Parser, Debug)]
#[command(name = "demo_app")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    listen: SocketAddr,

    /// Name included in responses.
    #[arg(long, default_value = "demo")]
    name: String,

    /// On SIGTERM only report it and keep serving.
    #[arg(long)]
    ignore_term: bool,

    /// Spawn a grandchild process (in the same process group) that ignores SIGTERM.
    #[arg(long)]
    spawn_grandchild: bool,

    /// Exit by itself after this many milliseconds (simulates a crash).
    #[arg(long, value_name = "MILLIS")]
    exit_after: Option<u64>,

    /// Exit code used for every exit.
    #[arg(long, default_value_t = 0, value_name = "N")]
    exit_code: u8,

    /// After a stop signal, keep serving existing connections this long before exiting.
    #[arg(long, default_value_t = 0, value_name = "MILLIS")]
    stop_delay: u64,

    /// Start listening only this many milliseconds after start-up (a slow start: a JVM, a cache
    /// to warm).
    #[arg(long, default_value_t = 0, value_name = "MILLIS")]
    listen_after: u64,

    /// Close the listener this many milliseconds after it opened, and go on running (an app
    /// that lost its listener).
    #[arg(long, value_name = "MILLIS")]
    close_listener_after: Option<u64>,

    /// Internal: the grandchild mode, ignore SIGTERM and sleep forever.
    #[arg(long, hide = true)]
    idle: bool,
}

/// Prints one line to stdout and flushes it right away (stdout may be a pipe).
/// Write errors (e.g. a closed pipe) are ignored: the app must keep running.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "demo-app: {line}");
    let _ = out.flush();
}

fn unix_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn signal_label(sig: i32) -> String {
    match signal_hook::low_level::signal_name(sig) {
        Some(name) => name.trim_start_matches("SIG").to_string(),
        None => sig.to_string(),
    }
}

/// When the last request arrived (unix ms; 0: none yet): what a drain is measured against.
static LAST_REQUEST: AtomicU64 = AtomicU64::new(0);

fn exit_now(code: u8) -> ! {
    match LAST_REQUEST.load(Ordering::SeqCst) {
        0 => {}
        ms => say(&format!("last request at {ms}")),
    }
    say(&format!("exiting with {code}"));
    std::process::exit(code.into());
}

/// Grandchild mode: catch SIGTERM and do nothing with it, forever.
fn idle() -> ! {
    // Installing a handler replaces the default "terminate" action.
    let flag = Arc::new(AtomicBool::new(false));
    if let Err(err) = signal_hook::flag::register(SIGTERM, flag) {
        eprintln!("demo-app: cannot catch SIGTERM in idle mode: {err}");
        std::process::exit(1);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Re-executes this binary with `--idle`, in the same process group. Not waited on:
/// whoever is PID 1 has to reap it.
fn spawn_grandchild() -> std::io::Result<u32> {
    let child = Command::new(std::env::current_exe()?)
        .arg("--idle")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(child.id())
}

async fn handle(
    req: Request<Incoming>,
    name: Arc<str>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    LAST_REQUEST.fetch_max(unix_millis() as u64, Ordering::SeqCst);
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => (
            StatusCode::OK,
            format!("hello from {name} (pid {})\n", std::process::id()),
        ),
        (&Method::GET, "/healthz") => (StatusCode::OK, "ok\n".to_string()),
        // The connection's task unwinds and the app goes on serving: proof that a build (the
        // static one compiles std itself) keeps panic = "unwind" working.
        (&Method::GET, "/panic") => panic!("GET /panic"),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    Ok(resp)
}

/// Reports every signal; flips `stop` on TERM (unless ignored), INT and QUIT.
async fn watch_signals(mut signals: Signals, ignore_term: bool, stop: watch::Sender<bool>) {
    while let Some(sig) = signals.next().await {
        say(&format!(
            "signal {} at {}",
            signal_label(sig),
            unix_millis()
        ));
        let stops = match sig {
            SIGTERM => !ignore_term,
            SIGINT | SIGQUIT => true,
            _ => false,
        };
        if stops {
            stop.send_replace(true);
        }
    }
}

async fn run(args: Args) -> std::io::Result<()> {
    // Catch signals before anything else so none falls through to its default action.
    let signals = Signals::new(REPORTED)?;
    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(watch_signals(signals, args.ignore_term, stop_tx));

    // A stop signal before the app listens stops it all the same.
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(args.listen_after)) => {}
        _ = stop_rx.wait_for(|stop| *stop) => exit_now(args.exit_code),
    }
    let listener = TcpListener::bind(args.listen).await?;
    say(&format!("listening on {}", listener.local_addr()?));
    let close_listener = async {
        match args.close_listener_after {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(close_listener);

    if args.spawn_grandchild {
        say(&format!("grandchild pid {}", spawn_grandchild()?));
    }

    let code = args.exit_code;
    if let Some(ms) = args.exit_after {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            exit_now(code);
        });
    }

    let name: Arc<str> = args.name.into();
    let lost_listener = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(conn) => conn,
                    Err(err) => {
                        eprintln!("demo-app: accept failed: {err}");
                        continue;
                    }
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, name.clone()));
                    // Keep-alive is on by default; errors are client-side noise here.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = stop_rx.wait_for(|stop| *stop) => break false,
            () = &mut close_listener => break true,
        }
    };
    drop(listener);
    if lost_listener {
        say("closed the listener");
        let _ = stop_rx.wait_for(|stop| *stop).await;
        exit_now(code);
    }

    // Stopped accepting; let open connections finish for --stop-delay.
    tokio::time::sleep(Duration::from_millis(args.stop_delay)).await;
    exit_now(code);
}

fn main() {
    let args = Args::parse();
    if args.idle {
        idle();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");
    if let Err(err) = runtime.block_on(run(args)) {
        eprintln!("demo-app: {err}");
        std::process::exit(1);
    }
}
