//! The durable outcome log of a device.
