//! Connecting to the broker and publishing with confirmation, for the one-shot fleet commands.

use std::time::Duration;

use tmo_protocol::link::{
    Delivered, DeliveryError, Link, LinkConfig, LinkError, LinkSetup, Message, PublishError, Publisher,
    Subscription,
};

/// The broker could not be reached, or a publish did not get through.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The link configuration is wrong or a TLS file is unusable.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// No connection within the time allowed.
    #[error(
        "no connection to the MQTT broker at {host}:{port} within {waited_ms} ms (is it running, and are the \
         address, credentials and TLS files right?)"
    )]
    NotConnected {
        /// Broker host.
        host: String,
        /// Broker port.
        port: u16,
        /// How long we waited.
        waited_ms: u64,
    },
    /// The publish was not taken.
    #[error("publishing on {topic}: {source}")]
    Publish {
        /// The topic.
        topic: String,
        /// Why.
        #[source]
        source: PublishError,
    },
    /// The publish was taken but not delivered.
    #[error("publishing on {topic}: {source}")]
    Delivery {
        /// The topic.
        topic: String,
        /// Why.
        #[source]
        source: DeliveryError,
    },
    /// The broker did not acknowledge in time.
    #[error("the broker did not acknowledge the publish on {topic} within {waited_ms} ms")]
    Unconfirmed {
        /// The topic.
        topic: String,
        /// How long we waited.
        waited_ms: u64,
    },
}

/// Starts a link (no availability topic) with `subscriptions` and waits until it is connected
/// with the subscriptions in place, at most `timeout`. Needs a tokio runtime.
pub async fn connect(
    config: &LinkConfig,
    subscriptions: Vec<Subscription>,
    timeout: Duration,
) -> Result<Link, NetError> {
    let link = Link::start(config, LinkSetup { availability_topic: None, subscriptions })?;
    if !link.wait_connected(timeout).await {
        link.abort().await;
        return Err(NetError::NotConnected {
            host: config.host.clone(),
            port: config.port,
            waited_ms: timeout.as_millis() as u64,
        });
    }
    Ok(link)
}

/// Publishes `message` and waits for the broker's acknowledgement (QoS 1) or the write (QoS 0),
/// at most `timeout`.
pub async fn publish_confirmed(
    publisher: &Publisher,
    message: Message,
    timeout: Duration,
) -> Result<Delivered, NetError> {
    let topic = message.topic.clone();
    let delivery = publisher
        .publish(message)
        .await
        .map_err(|source| NetError::Publish { topic: topic.clone(), source })?;
    match tokio::time::timeout(timeout, delivery.confirmed()).await {
        Ok(Ok(delivered)) => Ok(delivered),
        Ok(Err(source)) => Err(NetError::Delivery { topic, source }),
        Err(_) => Err(NetError::Unconfirmed { topic, waited_ms: timeout.as_millis() as u64 }),
    }
}
