//! Parses the command line and hands over to the library.
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = image_worker::cli::Cli::parse();
    image_worker::cli::init_logging(cli.log_format);
    image_worker::cli::run(cli).await
}
