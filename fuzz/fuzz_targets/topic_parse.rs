//! `Topic::parse`, which every received MQTT publish goes through, and the name validation of
//! device ids, group names and share groups. A parsed topic names itself exactly.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tmo_protocol::topic::filter;
use tmo_protocol::{DeviceId, GroupName, ShareGroup, Topic};

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    if let Ok(topic) = Topic::parse(text) {
        assert_eq!(topic.name(), text, "a parsed topic names itself");
        assert_eq!(Topic::parse(&topic.name()).as_ref(), Ok(&topic));
        let _ = (topic.device(), topic.single_packet(), topic.retained());
    }
    if let Ok(device) = DeviceId::new(text) {
        assert_eq!(device.as_str(), text);
        let status = Topic::Status(device.clone());
        assert_eq!(Topic::parse(&status.name()), Ok(status));
    }
    if let Ok(group) = GroupName::new(text) {
        let policy = Topic::Policy(group);
        assert_eq!(Topic::parse(&policy.name()), Ok(policy));
    }
    if let Ok(share) = ShareGroup::new(text) {
        assert!(filter::cloud_requests_shared(&share).starts_with("$share/"));
    }
});
