//! farsight: long-context LLM inference with the KV cache off the GPU.
//!
//! The command line: `generate`, `batch`, `serve`, `eval`, `convert-gguf`, `bench`. Every error ends the process
//! with one line on stderr and a non-zero status.

mod cli;
mod server;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A file-size limit (ulimit -f) then makes writes fail with EFBIG, reported as an error,
    // instead of killing the process with SIGXFSZ.
    #[cfg(unix)]
    // SAFETY: setting a signal to SIG_IGN installs no handler code; done before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = e.to_string().replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
