//! The async client (feature `tokio`): the same calls as the blocking one.
//!
//! `cargo run -p hsmd-protocol --features tokio --example async_status`

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), protocol::ClientError> {
    let mut hsmd = protocol::AsyncClient::connect(protocol::default_socket()).await?;
    let status = hsmd.status().await?;
    println!("hsmd {} is {}", status.daemon_version, status.state.as_str());
    Ok(())
}
