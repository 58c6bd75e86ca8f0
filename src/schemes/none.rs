//! Plain federated learning: updates travel as f32 safetensors and the server reads every one.

use std::time::Instant;

use candle_core::Device;
use rand::rngs::StdRng;

use super::{weighted_mean, Aggregate, NamedTensors, Scheme, ThreatModel, Upload, View};
use crate::fl::Transmission;
use crate::Result;

/// No protection: the baseline every other scheme is compared with.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainScheme;

impl Scheme for PlainScheme {
    fn id(&self) -> &str {
        "none"
    }

    fn parameters(&self) -> String {
        String::new()
    }

    fn encode(
        &mut self,
        _client: usize,
        update: &NamedTensors,
        _rng: &mut StdRng,
    ) -> Result<Upload> {
        let started = Instant::now();
        let transmission = Transmission::plain(update, None)?;
        Ok(Upload {
            transmission,
            encode_seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn server_reads(
        &self,
        upload: &Transmission,
        template: &NamedTensors,
    ) -> Result<Option<NamedTensors>> {
        let device = template
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        Ok(Some(upload.decode_plain("a client upload", &device)?))
    }

    fn aggregate(
        &mut self,
        weighted: &[(usize, &Upload)],
        template: &NamedTensors,
    ) -> Result<Aggregate> {
        let started = Instant::now();
        let decoded = weighted
            .iter()
            .map(|(samples, upload)| {
                let update = self
                    .server_reads(&upload.transmission, template)?
                    .unwrap_or_default();
                Ok((*samples, update))
            })
            .collect::<Result<Vec<_>>>()?;
        let mean_update = weighted_mean(&decoded, template)?;
        Ok(Aggregate {
            download_bytes_per_client: Transmission::plain(template, None)?.len(),
            mean_update,
            server_seconds: started.elapsed().as_secs_f64(),
            decode_seconds: 0.0,
        })
    }

    fn threat_models(&self) -> Vec<ThreatModel> {
        vec![ThreatModel {
            id: "server".into(),
            description: "An honest-but-curious server reads every client's update in the clear."
                .into(),
            view: View::ClientUpdates,
        }]
    }
}
