//! The proxy-wasm adapter (ABI 0.2.1): a root context that reads and validates the plugin
//! configuration once, and an http context per request that turns the core's decisions into
//! host calls (`set_http_request_header`, `send_http_response`, `dispatch_http_call`).
//!
//! The same module also runs the delayed-leave job service (MSC4140 delegation) when Envoy
//! loads it as a singleton `WasmService` with root id [`JOB_SERVICE_ROOT_ID`]: one root
//! context on Envoy's main thread owns every job ([`crate::job_service`]), registers the shared
//! queue [`JOB_QUEUE`], and is driven by `on_queue_ready` (handovers and webhook events the
//! http filters of every worker enqueue), `on_tick` and its own callouts. A job therefore
//! lives in exactly one place whatever worker served the request.
//!
//! Every host call goes through `proxy_wasm::hostcalls`, whose `Result`s are handled here,
//! instead of the SDK trait helpers that `unwrap` them: a panic would kill the VM. Facts this
//! relies on (measured on Envoy 1.40, README "Envoy notes"): a callback may carry zero headers
//! (reset after headers); a synchronous `dispatch_http_call` error means no callback will come.

use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::config::{self, Host, Settings, TokenService};
use crate::discovery::{CachedDelegation, DiscoveryCache};
use crate::exchange::{
    self, Callout, CalloutResult, CalloutTarget, Decision, Step, TokenExchange,
    MAX_REQUEST_BODY_BYTES,
};
use crate::job_service::{
    self, Answer, JobCallout, JobService, Message, Pending, MAX_ANSWER_BYTES,
};
use crate::logging;
use crate::logging::{loggable_request_id, set_request_id};
use crate::matrix::MatrixError;
use crate::metrics;
use crate::requests::TokenEndpoint;
use crate::response::LocalResponse;

#[allow(unsafe_code)] // the SDK's entry point macro calls the wasm constructors
mod entry {
    use super::*;
    proxy_wasm::main! {{
        install_logger();
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { settings: None, jobs: None }) });
    }}
}

/// Logs through the host ([`crate::logging::line`]: prefixed with the request id); the panic
/// hook installed with it logs a panic at `critical` before the VM aborts.
static LOGGER: logging::HostLog = logging::HostLog(|level, text| {
    let level = match level {
        log::Level::Error => LogLevel::Error,
        log::Level::Warn => LogLevel::Warn,
        log::Level::Info => LogLevel::Info,
        log::Level::Debug => LogLevel::Debug,
        log::Level::Trace => LogLevel::Trace,
    };
    let _ = hostcalls::log(level, text);
});

fn install_logger() {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("panic: {info}"));
    }));
}

/// Root id of the delayed-leave job service (`WasmService` `config.root_id`).
pub const JOB_SERVICE_ROOT_ID: &str = "matrixrtc_delayed_leave";
/// Name of the shared queue the job service registers and the http filters resolve.
pub const JOB_QUEUE: &str = "matrixrtc_livekit_auth.delayed_leave";
/// How often the job service wakes up to look at its jobs.
const TICK: Duration = Duration::from_millis(100);
/// Shared-data key where the job service publishes `"<now ms> <full 0|1>"` every tick, so the
/// http filter can refuse a handover (503) instead of losing it when the service is gone (its
/// VM crashed) or full.
const JOB_STATUS_KEY: &str = "matrixrtc_livekit_auth.delayed_leave.status";
/// Publishes the job service's status (see [`JOB_STATUS_KEY`]).
fn publish_status(jobs: &JobService) {
    let status = job_service::status(now_ms(), jobs.is_full());
    if let Err(status) = hostcalls::set_shared_data(JOB_STATUS_KEY, Some(&status), None) {
        log::warn!("delayed leave: publishing the job service status failed: {status:?}");
    }
}

/// Why the job service cannot take a message now, from its published status.
fn job_service_unavailable(handover: bool) -> Option<String> {
    let (bytes, _) = hostcalls::get_shared_data(JOB_STATUS_KEY).ok()?;
    job_service::unavailable(bytes.as_deref(), now_ms(), handover)
}

/// Root context: owns the validated plugin configuration; in the job service, the jobs.
struct Root {
    settings: Option<Rc<Settings>>,
    jobs: Option<JobRunner>,
}

/// The job service's state (root context of the singleton `WasmService`).
struct JobRunner {
    jobs: JobService,
    queue: u32,
    /// Callouts in flight: token, job, what it waits for, target, start (ms). A list, not a
    /// map: a job has at most two callouts in flight, and a map's code costs size.
    in_flight: Vec<(u32, u64, Pending, CalloutTarget, u64)>,
}

impl Root {
    /// Makes the callouts jobs asked for; a callout that cannot be dispatched is answered as
    /// "no answer" at once (the job retries later), so this never loops.
    fn run_callouts(&mut self, mut callouts: Vec<JobCallout>) {
        let (Some(settings), Some(runner)) = (self.settings.clone(), self.jobs.as_mut()) else {
            return;
        };
        let Some(service) = settings.token_service.as_ref() else {
            return;
        };
        let mut budget = 10_000usize;
        while let Some(c) = callouts.pop() {
            budget = budget.saturating_sub(1);
            if budget == 0 {
                log::error!("delayed leave: too many callouts at once; dropping the rest");
                break;
            }
            let cluster = cluster_for(service, c.callout.target, c.callout.upstream.tls);
            match dispatch(cluster, &c.callout) {
                Ok(token) => {
                    runner
                        .in_flight
                        .push((token, c.job, c.pending, c.callout.target, now_ms()));
                }
                Err(detail) => {
                    count(&metrics::callouts(c.callout.target, None, false));
                    log::warn!(
                        "delayed leave: callout to {} via cluster {cluster} not dispatched: {detail}",
                        c.callout.upstream.authority
                    );
                    let next =
                        runner
                            .jobs
                            .answer(service, c.job, c.pending, Answer::default(), now_ms());
                    callouts.extend(next);
                }
            }
        }
        record_jobs(&mut runner.jobs);
    }
}

/// Counts finished jobs and sets the running-jobs gauge.
fn record_jobs(jobs: &mut JobService) {
    for outcome in jobs.take_finished() {
        count(&metrics::delayed_leave_jobs(outcome));
    }
    if let Some(id) = metric_id(metrics::DELAYED_LEAVE_JOBS_RUNNING, MetricType::Gauge) {
        let _ = hostcalls::record_metric(id, u64::try_from(jobs.len()).unwrap_or(u64::MAX));
    }
}

/// The cluster a callout goes through (plugin configuration `envoy…Cluster` keys).
fn cluster_for(service: &TokenService, target: CalloutTarget, tls: bool) -> &str {
    match (target, tls) {
        (CalloutTarget::LiveKit, _) => &service.envoy_livekit_cluster,
        (_, true) if service.insecure_skip_verify => &service.envoy_insecure_tls_cluster,
        (_, true) => &service.envoy_tls_cluster,
        (_, false) => &service.envoy_plain_cluster,
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        set_request_id(None);
        let (Some(settings), Some(runner)) = (self.settings.clone(), self.jobs.as_mut()) else {
            return;
        };
        let Some(service) = settings.token_service.as_ref() else {
            return;
        };
        let Some(at) = runner.in_flight.iter().position(|f| f.0 == token_id) else {
            return;
        };
        let (_, job, pending, target, started) = runner.in_flight.swap_remove(at);
        let now = now_ms();
        record(
            &metrics::callout_duration_ms(target),
            now.saturating_sub(started),
        );
        let read = CallAnswer::read(body_size, MAX_ANSWER_BYTES);
        count(&metrics::callouts(target, read.status, true));
        let answer = Answer {
            status: read.status,
            retry_after: read.header("retry-after"),
            body: &read.body,
        };
        let next = runner.jobs.answer(service, job, pending, answer, now);
        self.run_callouts(next);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        set_request_id(None);
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(b) => b.unwrap_or_default(),
            Err(status) => {
                log::error!("invalid plugin configuration: cannot read it ({status:?})");
                return false;
            }
        };
        let parsed = Settings::from_json(&bytes, &|name| std::env::var(name).ok())
            .and_then(|s| config::refuse_keys_of_other_host(&bytes, Host::Envoy).map(|()| s));
        match parsed {
            Ok(settings) if is_job_service() => self.start_job_service(settings),
            Ok(settings) => {
                log::set_max_level(settings.log_level);
                let prefixes: Vec<&str> =
                    settings.strip_prefixes.iter().map(|p| p.as_str()).collect();
                match &settings.token_service {
                    Some(t) => log::info!(
                        "configured: stripPrefixes {prefixes:?}; token service on, LiveKit API {}://{}{} via cluster {}, homeserver callout clusters {} / {}",
                        if t.livekit_api.tls { "https" } else { "http" },
                        t.livekit_api.authority,
                        t.livekit_api.base_path,
                        t.envoy_livekit_cluster,
                        t.envoy_tls_cluster,
                        t.envoy_plain_cluster,
                    ),
                    None => log::info!("configured: stripPrefixes {prefixes:?}; token service off"),
                }
                self.settings = Some(Rc::new(settings));
                true
            }
            Err(e) => {
                log::error!("{e}");
                false
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        set_request_id(None);
        let (Some(settings), Some(runner)) = (self.settings.clone(), self.jobs.as_mut()) else {
            return;
        };
        let Some(service) = settings.token_service.as_ref() else {
            return;
        };
        if queue_id != runner.queue {
            return;
        }
        let mut callouts = Vec::new();
        while let Ok(Some(bytes)) = hostcalls::dequeue_shared_queue(queue_id) {
            match Message::decode(&bytes) {
                Some(message) => callouts.extend(runner.jobs.receive(service, message, now_ms())),
                None => log::error!("delayed leave: unreadable message in the job queue"),
            }
        }
        self.run_callouts(callouts);
    }

    fn on_tick(&mut self) {
        set_request_id(None);
        let (Some(settings), Some(runner)) = (self.settings.clone(), self.jobs.as_mut()) else {
            return;
        };
        let Some(service) = settings.token_service.as_ref() else {
            return;
        };
        let now = now_ms();
        publish_status(&runner.jobs);
        if runner.jobs.next_wakeup().is_some_and(|at| at <= now) {
            let callouts = runner.jobs.tick(service, now);
            self.run_callouts(callouts);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // The SDK panics on `None`; without settings (never configured) the filter passes
        // everything through.
        Some(Box::new(Filter {
            settings: self.settings.clone(),
            phase: Phase::Idle,
            request_id: None,
            authorization: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// `true` when this root context is the job service (root id [`JOB_SERVICE_ROOT_ID`]).
fn is_job_service() -> bool {
    hostcalls::get_property(vec!["plugin_root_id"])
        .ok()
        .flatten()
        .is_some_and(|id| id == JOB_SERVICE_ROOT_ID.as_bytes())
}

/// The job queue as seen from an http filter: `Some` when the job service runs in this Envoy
/// (same `vm_id`).
fn job_queue() -> Option<u32> {
    let vm_id = hostcalls::get_property(vec!["plugin_vm_id"])
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default();
    hostcalls::resolve_shared_queue(&vm_id, JOB_QUEUE)
        .ok()
        .flatten()
}

impl Root {
    fn start_job_service(&mut self, settings: Settings) -> bool {
        log::set_max_level(settings.log_level);
        if settings.token_service.is_none() {
            // Strip-prefix only: no token service, so nothing is ever delegated.
            log::info!("delayed-leave job service idle: the token service is off (no livekitUrl)");
            return true;
        }
        let queue = match hostcalls::register_shared_queue(JOB_QUEUE) {
            Ok(q) => q,
            Err(status) => {
                log::error!("delayed leave: registering the job queue failed: {status:?}");
                return false;
            }
        };
        if let Err(status) = hostcalls::set_tick_period(TICK) {
            log::error!("delayed leave: setting the tick period failed: {status:?}");
            return false;
        }
        log::info!(
            "delayed-leave job service running (queue {JOB_QUEUE}, sanity check every {} ms)",
            settings
                .token_service
                .as_ref()
                .map_or(0, |t| t.sanity_check_interval_ms)
        );
        self.settings = Some(Rc::new(settings));
        let mut jobs = JobService::new();
        // The gauge exists from the start (0), so an alert on it never sees "no data".
        record_jobs(&mut jobs);
        publish_status(&jobs);
        self.jobs = Some(JobRunner {
            jobs,
            queue,
            in_flight: Vec::new(),
        });
        true
    }
}

enum Phase {
    Idle,
    ReadingBody(TokenEndpoint),
    AwaitingCallout {
        token: u32,
        exchange: TokenExchange,
        endpoint: TokenEndpoint,
        target: CalloutTarget,
        started_ms: u64,
    },
    Answered,
}

/// Http context: one request.
struct Filter {
    settings: Option<Rc<Settings>>,
    phase: Phase,
    /// `x-request-id` of a token request (read only for those: they are what logs).
    request_id: Option<String>,
    /// `authorization` of a `/sfu_webhook` request (LiveKit's signature token).
    authorization: Option<String>,
}

/// A request header's value; `None` when absent or not UTF-8. Read as bytes: the SDK's
/// `get_map_value` unwraps UTF-8 and would panic (killing the VM) on a client's stray byte.
fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
        .and_then(|v| String::from_utf8(v).ok())
}

/// A callout's answer as read in `on_http_call_response`: headers (values decoded lossily;
/// read as bytes because the SDK's `get_map` unwraps UTF-8 and would panic on a server's stray
/// byte; names are HTTP tokens, Envoy's codec refuses anything else), the status, and at most
/// `max` bytes of body. Zero headers is possible (reset after headers): the status is then
/// `None`, never assumed.
struct CallAnswer {
    headers: Vec<(String, String)>,
    status: Option<u16>,
    body: Vec<u8>,
}

impl CallAnswer {
    /// Reads the answer of the callout being reported (`body_size` from the callback).
    fn read(body_size: usize, max: usize) -> Self {
        let headers: Vec<(String, String)> =
            hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders)
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                .collect();
        let status = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.parse::<u16>().ok());
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size.min(max))
            .ok()
            .flatten()
            .unwrap_or_default();
        Self {
            headers,
            status,
            body,
        }
    }

    /// The value of header `name` (case-insensitive), if present.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

thread_local! {
    /// Metric ids defined in this VM, by name (proxy-wasm ids are per VM).
    static METRIC_IDS: std::cell::RefCell<std::collections::BTreeMap<String, u32>> =
        const { std::cell::RefCell::new(std::collections::BTreeMap::new()) };
}

fn metric_id(name: &str, kind: MetricType) -> Option<u32> {
    METRIC_IDS.with(|ids| {
        if let Some(id) = ids.borrow().get(name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(kind, name).ok()?;
        ids.borrow_mut().insert(name.to_owned(), id);
        Some(id)
    })
}

/// Adds one to the counter `name` (see [`metrics`]); failures are ignored (metrics never
/// break a request).
fn count(name: &str) {
    if let Some(id) = metric_id(name, MetricType::Counter) {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

/// Records `value` in the histogram `name`.
fn record(name: &str, value: u64) {
    if let Some(id) = metric_id(name, MetricType::Histogram) {
        let _ = hostcalls::record_metric(id, value);
    }
}

fn now_secs() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

impl Filter {
    fn respond(&mut self, response: &LocalResponse) -> Action {
        let headers: Vec<(&str, &str)> = response
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let body = (!response.body.is_empty()).then_some(response.body.as_slice());
        if let Err(status) =
            hostcalls::send_http_response(u32::from(response.status), headers, body)
        {
            log::error!("send_http_response failed: {status:?}");
        }
        self.phase = Phase::Answered;
        Action::Pause
    }

    fn finish_body(&mut self, endpoint: TokenEndpoint, body: &[u8]) -> Action {
        let Some(settings) = self.settings.clone() else {
            return Action::Continue;
        };
        let Some(service) = settings.token_service.as_ref() else {
            return Action::Continue;
        };
        if endpoint == TokenEndpoint::SfuWebhook {
            let (response, message) =
                exchange::sfu_webhook(service, self.authorization.as_deref(), body, now_secs());
            let response = match message {
                Some(m) => hand_over(&m).map_or_else(LocalResponse::error, |()| response),
                None => response,
            };
            count(&metrics::token_requests(
                endpoint,
                metrics::outcome(&response, None),
            ));
            return self.respond(&response);
        }
        let (exchange, step) = TokenExchange::start(
            service,
            endpoint,
            body,
            &SharedDataCache,
            now_secs(),
            || job_queue().is_some(),
        );
        self.drive(endpoint, exchange, step)
    }

    /// Runs steps until one needs to wait for a callout or answers the client.
    fn drive(
        &mut self,
        endpoint: TokenEndpoint,
        mut exchange: TokenExchange,
        mut step: Step,
    ) -> Action {
        let Some(settings) = self.settings.clone() else {
            return Action::Continue;
        };
        let Some(service) = settings.token_service.as_ref() else {
            return Action::Continue;
        };
        loop {
            match step {
                Step::Respond(r) => {
                    let outcome = metrics::outcome(&r, exchange.issued_full_access());
                    count(&metrics::token_requests(endpoint, outcome));
                    return self.respond(&r);
                }
                Step::Handover { handover, response } => {
                    let response = hand_over(&Message::Handover(handover))
                        .map_or_else(LocalResponse::error, |()| response);
                    let outcome = metrics::outcome(&response, exchange.issued_full_access());
                    count(&metrics::token_requests(endpoint, outcome));
                    return self.respond(&response);
                }
                Step::Callout(c) => {
                    let cluster = cluster_for(service, c.target, c.upstream.tls);
                    match dispatch(cluster, &c) {
                        Ok(token) => {
                            self.phase = Phase::AwaitingCallout {
                                token,
                                exchange,
                                endpoint,
                                target: c.target,
                                started_ms: now_ms(),
                            };
                            return Action::Pause;
                        }
                        Err(detail) => {
                            count(&metrics::callouts(c.target, None, false));
                            // No callback will ever come: answer now.
                            log::warn!(
                                "callout to {} via cluster {cluster} not dispatched: {detail}",
                                c.upstream.authority
                            );
                            let result = CalloutResult {
                                status: None,
                                body: &[],
                                cache_control: None,
                                detail: &detail,
                            };
                            step = exchange.on_callout_response(
                                service,
                                result,
                                &SharedDataCache,
                                now_secs(),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Enqueues `message` for the job service.
///
/// # Errors
/// [`MatrixError::DELEGATION_FAILED`] when the job service is not running, has not reported
/// for [`job_service::STATUS_STALE_MS`], is full (handovers only), or the queue refuses the message
/// (logged).
fn hand_over(message: &Message) -> Result<(), MatrixError> {
    let Some(queue) = job_queue() else {
        log::error!("delayed leave: the job service ({JOB_SERVICE_ROOT_ID}) is not running");
        return Err(MatrixError::DELEGATION_FAILED);
    };
    let handover = matches!(message, Message::Handover(_));
    if let Some(why) = job_service_unavailable(handover) {
        log::error!("delayed leave: the job service cannot take this: {why}");
        return Err(MatrixError::DELEGATION_FAILED);
    }
    hostcalls::enqueue_shared_queue(queue, Some(&message.encode())).map_err(|status| {
        log::error!("delayed leave: enqueueing for the job service failed: {status:?}");
        MatrixError::DELEGATION_FAILED
    })
}

/// `.well-known` results in proxy-wasm shared data, visible to every worker's VM. Bounded: a
/// server name hashes to one of [`CACHE_SLOTS`] keys and a collision overwrites the slot, so the
/// cache never holds more than that many entries whatever clients send.
struct SharedDataCache;

/// Number of shared-data keys the discovery cache may use.
const CACHE_SLOTS: u64 = 4096;

#[derive(serde::Serialize, serde::Deserialize)]
struct SlotValue {
    server: String,
    authority: Option<String>,
    expires_at: u64,
}

fn slot_key(server_name: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(server_name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
    format!(
        "matrixrtc_livekit_auth.well_known.{}",
        u64::from_le_bytes(first) % CACHE_SLOTS
    )
}

impl DiscoveryCache for SharedDataCache {
    fn get(&self, server_name: &str) -> Option<CachedDelegation> {
        let (bytes, _) = hostcalls::get_shared_data(&slot_key(server_name)).ok()?;
        let found = bytes
            .and_then(|b| serde_json::from_slice::<SlotValue>(&b).ok())
            .filter(|v| v.server == server_name);
        count(&metrics::well_known_cache(
            found.as_ref().is_some_and(|v| v.expires_at > now_secs()),
        ));
        found.map(|value| CachedDelegation {
            authority: value.authority,
            expires_at: value.expires_at,
        })
    }

    fn put(&self, server_name: &str, entry: &CachedDelegation) {
        let value = SlotValue {
            server: server_name.to_owned(),
            authority: entry.authority.clone(),
            expires_at: entry.expires_at,
        };
        if let Ok(bytes) = serde_json::to_vec(&value) {
            if let Err(status) =
                hostcalls::set_shared_data(&slot_key(server_name), Some(&bytes), None)
            {
                log::warn!("caching discovery for {server_name} failed: {status:?}");
            }
        }
    }
}

fn dispatch(cluster: &str, c: &Callout) -> Result<u32, String> {
    let scheme = if c.upstream.tls { "https" } else { "http" };
    let mut headers: Vec<(&str, &str)> = vec![
        (":method", c.method),
        (":path", &c.path),
        (":authority", &c.upstream.authority),
        (":scheme", scheme),
        ("user-agent", crate::USER_AGENT),
    ];
    headers.extend(c.headers.iter().map(|(k, v)| (*k, v.as_str())));
    let body = (!c.body.is_empty()).then_some(c.body.as_slice());
    hostcalls::dispatch_http_call(
        cluster,
        headers,
        body,
        vec![],
        Duration::from_millis(c.timeout_ms),
    )
    .map_err(|status| format!("dispatch_http_call returned {status:?}"))
}

impl Context for Filter {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        set_request_id(self.request_id.clone());
        let Phase::AwaitingCallout { token, .. } = &self.phase else {
            return;
        };
        if *token != token_id {
            return;
        }
        let Phase::AwaitingCallout {
            mut exchange,
            endpoint,
            target,
            started_ms,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return;
        };
        record(
            &metrics::callout_duration_ms(target),
            now_ms().saturating_sub(started_ms),
        );
        let Some(settings) = self.settings.clone() else {
            return;
        };
        let Some(service) = settings.token_service.as_ref() else {
            return;
        };
        let read = CallAnswer::read(body_size, exchange.max_callout_body());
        let (status, body) = (read.status, &read.body);
        let genuine = read.header("x-envoy-upstream-service-time").is_some();
        // Envoy's own local replies (connect failure, timeout) explain themselves in the body;
        // a genuine upstream body is not logged.
        let detail = if status.is_some_and(|s| (200..300).contains(&s)) || genuine {
            String::new()
        } else {
            let text: String =
                String::from_utf8_lossy(body.get(..body.len().min(160)).unwrap_or_default()).into();
            format!("(proxy: {})", text.trim())
        };
        let result = CalloutResult {
            status,
            body,
            cache_control: read.header("cache-control"),
            detail: &detail,
        };
        count(&metrics::callouts(target, status, true));
        let step = exchange.on_callout_response(service, result, &SharedDataCache, now_secs());
        let _ = self.drive(endpoint, exchange, step);
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        set_request_id(None);
        let Some(settings) = self.settings.clone() else {
            return Action::Continue;
        };
        let Some(target) = request_header(":path") else {
            return Action::Continue;
        };
        // `:method` is read only for the token endpoints: one host call less per request.
        match exchange::route_lazy(&settings, &target, || request_header(":method")) {
            Decision::PassThrough => Action::Continue,
            Decision::Forward { prefix, target } => {
                let set =
                    hostcalls::set_map_value(MapType::HttpRequestHeaders, ":path", Some(&target))
                        .and_then(|()| {
                            hostcalls::set_map_value(
                                MapType::HttpRequestHeaders,
                                "x-forwarded-prefix",
                                Some(prefix.as_str()),
                            )
                        });
                match set {
                    Ok(()) => count(metrics::STRIP_PREFIX_REWRITES),
                    Err(status) => log::error!("rewriting the request path failed: {status:?}"),
                }
                Action::Continue
            }
            Decision::Respond(r) => self.respond(&r),
            Decision::ReadBody(endpoint) => {
                self.request_id = loggable_request_id(request_header("x-request-id"));
                set_request_id(self.request_id.clone());
                if exchange::needs_job_service(endpoint) && job_queue().is_none() {
                    log::warn!(
                        "{endpoint:?} asked, but the delayed-leave job service \
                         ({JOB_SERVICE_ROOT_ID}) does not run in this Envoy (no \
                         bootstrap_extensions block, or its vm_config.vm_id differs from this \
                         filter's)"
                    );
                    count(&metrics::token_requests(endpoint, "unavailable"));
                    return self.respond(&LocalResponse::error(
                        MatrixError::DELEGATION_ENDPOINT_UNAVAILABLE,
                    ));
                }
                if endpoint == TokenEndpoint::SfuWebhook {
                    self.authorization = request_header("authorization");
                }
                log::debug!("token request to {endpoint:?}: reading the body");
                let declared =
                    request_header("content-length").and_then(|v| v.trim().parse::<usize>().ok());
                if declared.is_some_and(|n| n > MAX_REQUEST_BODY_BYTES) {
                    count(&metrics::token_requests(endpoint, "too_large"));
                    return self.respond(&LocalResponse::error(MatrixError::TOO_LARGE));
                }
                if end_of_stream {
                    return self.finish_body(endpoint, &[]);
                }
                self.phase = Phase::ReadingBody(endpoint);
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        set_request_id(self.request_id.clone());
        log::debug!("request body: {body_size} bytes buffered, end_of_stream {end_of_stream}");
        let Phase::ReadingBody(endpoint) = self.phase else {
            return match self.phase {
                Phase::Idle => Action::Continue,
                _ => Action::Pause,
            };
        };
        if body_size > MAX_REQUEST_BODY_BYTES {
            count(&metrics::token_requests(endpoint, "too_large"));
            return self.respond(&LocalResponse::error(MatrixError::TOO_LARGE));
        }
        if !end_of_stream {
            return Action::Pause; // keep buffering
        }
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.finish_body(endpoint, &body)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        set_request_id(self.request_id.clone());
        // A body followed by trailers never has end_of_stream set in the body callback.
        let Phase::ReadingBody(endpoint) = self.phase else {
            return match self.phase {
                Phase::Idle => Action::Continue,
                _ => Action::Pause,
            };
        };
        let body =
            hostcalls::get_buffer(BufferType::HttpRequestBody, 0, MAX_REQUEST_BODY_BYTES + 1)
                .ok()
                .flatten()
                .unwrap_or_default();
        if body.len() > MAX_REQUEST_BODY_BYTES {
            return self.respond(&LocalResponse::error(MatrixError::TOO_LARGE));
        }
        self.finish_body(endpoint, &body)
    }
}
