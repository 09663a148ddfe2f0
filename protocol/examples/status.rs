//! Connects to hsmd (`$HSMD_SOCKET`, else the system socket) and prints what
//! it says about itself and about the caller.
//!
//! `cargo run -p hsmd-protocol --example status`

fn main() -> Result<(), protocol::ClientError> {
    let mut hsmd = protocol::Client::connect_default()?;
    let status = hsmd.status()?;
    println!(
        "hsmd {} is {} ({} of {} connections in use)",
        status.daemon_version,
        status.state.as_str(),
        status.connections,
        status.max_connections
    );
    let me = hsmd.whoami()?;
    println!("it sees you as uid {} with roles {:?}", me.uid, me.roles);
    Ok(())
}
