//! Stage 4, cloud actions only: the chosen views are captured (JPEG; audio: the last utterance
//! as WAV) and go with the question and the dialogue's history into one cloud request.

use std::sync::Arc;
use std::time::Duration;

use llm_engine::Conversation;
use policy_onnx::{Action, TaskCategory};
use sensing::ViewSnapshot;
use tmo_protocol::{Attachment, CloudRequest, HistoryTurn, MediaType, RequestId};

use crate::dialogues::TurnStart;
use crate::estimates::CostEstimates;
use crate::link::DeviceLink;
use crate::service::Service;
use crate::util::{lock, unix_ms_now};

/// A cloud request ready to go, and how long to wait for its reply.
pub(super) struct CloudCall {
    pub link: Arc<DeviceLink>,
    pub request: CloudRequest,
    pub wait: Duration,
    /// The app's own images among the attachments.
    pub app_images: u32,
}

/// The modality index of the app's own images in a cloud request (past every board's).
pub const APP_IMAGE_MODALITY: u8 = u8::MAX;

impl Service {
    /// The camera views' frames at the turn's arrival, their encoding started on another
    /// thread (about 2 ms a 640x480 view) while the question is classified and decided, so that
    /// a cloud action attaching them does not wait for it. Only when a cloud that takes images is
    /// reachable (otherwise empty: nothing is encoded); a local decision wastes that encoding,
    /// on a core the classifier does not use.
    pub(super) fn snapshot_views(&self) -> ViewSnapshot {
        if !(self.cloud_reachable() && self.cloud_takes_media(MediaType::ImageJpeg)) {
            return ViewSnapshot::default();
        }
        let views = self.sensing.snapshot_views();
        self.sensing.encode_snapshot(&views);
        views
    }

    /// The cloud request of a cloud action (`None` for a local one, or without an MQTT link).
    /// The wait is the dialogue's remaining latency budget less the expected local answer (so
    /// that a fallback still fits), within `[cloud] min_wait_secs..=max_wait_secs`.
    pub(super) fn attach(
        &self,
        start: &TurnStart,
        task: TaskCategory,
        question: &str,
        action: Action,
        app_images: Vec<Vec<u8>>,
        views: &ViewSnapshot,
    ) -> Option<CloudCall> {
        let (Some(link), Action::Cloud { modalities }) = (&self.cloud, action) else { return None };
        let c = &self.config.file.cloud;
        let expected_local = lock(&self.estimates).cost(CostEstimates::class_of(None)).latency_secs;
        let wait_secs =
            (start.remaining_latency_secs - expected_local).clamp(c.min_wait_secs, c.max_wait_secs);
        let wait = Duration::from_secs_f64(wait_secs);
        let mut request = CloudRequest {
            request_id: RequestId::generate(),
            device_id: link.device().clone(),
            dialogue_id: start.dialogue_id.clone(),
            turn: start.turn,
            task: task.name().to_owned(),
            question: question.to_owned(),
            history: history(&start.conversation, c.max_history_turns),
            attachments: modalities.indices().filter_map(|i| self.attachment(i, views)).collect(),
            deadline_unix_ms: unix_ms_now() + wait.as_millis() as u64,
            max_tokens: c.max_tokens,
            stream: c.stream,
        };
        // The app's images go too, when the cloud takes images.
        let app_images = if self.cloud_takes_media(MediaType::ImageJpeg) { app_images } else { Vec::new() };
        let app_sent = app_images.len() as u32;
        request.attachments.extend(app_images.into_iter().enumerate().map(|(i, data)| Attachment {
            modality: APP_IMAGE_MODALITY,
            name: format!("app-image-{i}"),
            media_type: MediaType::ImageJpeg,
            data,
        }));
        Some(CloudCall { link: link.clone(), request, wait, app_images: app_sent })
    }

    /// The JPEG of camera modality `index` (its frame in `views`, else its latest), or the
    /// latest utterance of an audio one. A modality that cannot be captured now is left out (and
    /// logged): the question still goes.
    fn attachment(&self, index: usize, views: &ViewSnapshot) -> Option<Attachment> {
        let name = self.modality_names.get(index)?.clone();
        let captured = match self.sensing.snapshot_jpeg(index, views) {
            Ok(jpeg) => Ok((MediaType::ImageJpeg, jpeg.bytes)),
            Err(sensing::SensingError::WrongKind { .. }) => {
                self.sensing.utterance_wav().map(|wav| (MediaType::AudioWav, wav))
            }
            Err(e) => Err(e),
        };
        match captured {
            Ok((media_type, data)) => Some(Attachment { modality: index as u8, name, media_type, data }),
            Err(e) => {
                tracing::warn!(modality = %name, "not attached to the cloud request: {e}");
                None
            }
        }
    }
}

/// The dialogue's last `max_turns` exchanges, as the cloud request carries them.
fn history(conversation: &Conversation, max_turns: usize) -> Vec<HistoryTurn> {
    let exchanges: Vec<HistoryTurn> = conversation
        .exchanges()
        .map(|(question, answer)| HistoryTurn { question: question.to_owned(), answer: answer.to_owned() })
        .collect();
    exchanges[exchanges.len().saturating_sub(max_turns)..].to_vec()
}
