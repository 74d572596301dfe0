//! `freshet-coordinator`: the same as `freshet coordinator`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    freshet_cli::run_as("coordinator").await
}
