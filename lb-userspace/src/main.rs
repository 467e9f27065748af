//! `lb`: the XDP load balancer's agent and CLI. Parsing and execution live in `cli`; everything
//! else is in the library. `anyhow` stops here: the exit code follows the error's kind
//! (see the README's table), 1 for anything without one.
mod cli;

fn exit_code(err: &anyhow::Error) -> i32 {
    err.chain()
        .find_map(|e| e.downcast_ref::<lb_userspace::Error>())
        .map_or(1, |e| e.kind().exit_code())
}

/// The error and its causes on one line, each cause once: our errors already name their
/// source in their own message, so a cause that the line holds already is not repeated.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let parsed = <cli::Cli as clap::Parser>::parse();
    if !matches!(parsed.command, cli::Top::Run(_) | cli::Top::Samples { .. }) {
        // A CLI command (`lb stats | head`) ends quietly when its reader goes away, as other
        // CLI tools do. The servers keep Rust's default (ignored) so a peer cannot kill them.
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lb: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(err) = rt.block_on(cli::execute(parsed)) {
        eprintln!("lb: {}", one_line(&err));
        std::process::exit(exit_code(&err));
    }
}
