//! `lb`: the XDP load balancer's agent and CLI. Parsing and execution live in `cli`; everything
//! else is in the library. `anyhow` stops here: the exit code follows the error's kind
//! (see the README's table), 1 for anything without one.
mod cli;

fn exit_code(err: &anyhow::Error) -> i32 {
    err.chain()
        .find_map(|e| e.downcast_ref::<lb_userspace::Error>())
        .map_or(1, |e| e.kind().exit_code())
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let parsed = <cli::Cli as clap::Parser>::parse();
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
        eprintln!("lb: {err:#}");
        std::process::exit(exit_code(&err));
    }
}
