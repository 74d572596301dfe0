//! The `freshet` command (see the library for the commands).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    freshet_cli::run(std::env::args_os()).await
}
