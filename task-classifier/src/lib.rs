//! The task category of a question, predicted on the device.
