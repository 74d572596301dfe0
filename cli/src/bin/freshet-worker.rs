//! `freshet-worker`: the same as `freshet worker`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    freshet_cli::run_as("worker").await
}
