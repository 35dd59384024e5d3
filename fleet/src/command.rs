//! Group commands (rollback), published retained as JSON on `tmo/v1/group/<g>/cmd`.
//!
//! Retained, so that a device offline when the command was issued gets it when it reconnects;
//! each command has a fresh id, so a device applies it once however often it is delivered.

use std::time::Duration;

use rand::TryRngCore;
use tmo_protocol::codec::{EncodeError, JsonMessage, MESSAGE_VERSION};
use tmo_protocol::link::{LinkConfig, Message, Publisher, QoS};
use tmo_protocol::{Command, GroupCommand, GroupName, Topic};

use crate::net::{self, NetError};

/// Why a command could not be published.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Encoding failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The broker could not be reached or did not take the publish.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The operating system's random source failed.
    #[error("no randomness for a command id: {0}")]
    Random(String),
}

/// A rollback command with a fresh id (16 random bytes in hex), issued now: back to the
/// previous policy, or to `to_version` if the device still has it.
pub fn rollback_command(to_version: Option<String>) -> Result<GroupCommand, CommandError> {
    let mut id = [0u8; 16];
    rand::rngs::OsRng.try_fill_bytes(&mut id).map_err(|e| CommandError::Random(e.to_string()))?;
    Ok(GroupCommand {
        v: MESSAGE_VERSION,
        command_id: hex::encode(id),
        issued_unix_ms: crate::unix_ms_now(),
        command: Command::Rollback { to_version },
    })
}

/// Publishes `command` retained, QoS 1, on the group's command topic; waits for the PUBACK.
pub async fn publish_command(
    publisher: &Publisher,
    group: &GroupName,
    command: &GroupCommand,
    timeout: Duration,
) -> Result<(), CommandError> {
    let topic = Topic::GroupCommand(group.clone()).name();
    let message = Message::new(topic, QoS::AtLeastOnce, command.to_json()?).retained(true);
    net::publish_confirmed(publisher, message, timeout).await?;
    Ok(())
}

/// Connects with `config`, publishes the command (see [`publish_command`]) and disconnects.
pub async fn send_command(
    config: &LinkConfig,
    group: &GroupName,
    command: &GroupCommand,
    timeout: Duration,
) -> Result<(), CommandError> {
    let link = net::connect(config, Vec::new(), timeout).await?;
    let result = publish_command(&link.publisher(), group, command, timeout).await;
    link.shutdown(Duration::from_secs(2)).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollback_commands_have_fresh_ids_and_encode_as_protocol_json() {
        let a = rollback_command(None).unwrap();
        let b = rollback_command(Some("p-3".into())).unwrap();
        assert_ne!(a.command_id, b.command_id);
        assert_eq!(a.command_id.len(), 32);
        assert!(a.issued_unix_ms > 1_700_000_000_000);
        let json = b.to_json().unwrap();
        assert_eq!(GroupCommand::from_json(&json, 4096).unwrap(), b);
        let text = String::from_utf8(json).unwrap();
        assert!(text.contains(r#""kind":"rollback""#) && text.contains(r#""to_version":"p-3""#), "{text}");
    }
}
