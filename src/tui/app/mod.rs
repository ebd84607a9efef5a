//! The TUI's one `State` and the pure `update(&mut State, Msg) -> Vec<Job>`: keys resolve through the keymap
//! to actions, actions and worker events change the state and return jobs for the worker. No I/O here: human
//! decisions become `SessionEvent`s that are applied to the in-memory fold at once (so the screen never
//! waits) and sent to the worker to append.

pub mod iterate;
pub mod stats;

use super::action::{Action, Mode};
use super::keymap::{KeyChord, KeyCode, KeyResult, Keymap};
use crate::model::generate::Sampling;
use crate::rounds::Stopped;
use crate::score::{ReasonKind, ScoredCompletion, Verdict};
use crate::session::state::{apply as apply_event, RoundState};
use crate::session::{DecisionKind, Gate, SessionDir, SessionEvent, SessionManifest, SessionState};
use crate::worker::{GenerateRequest, Job, JobId, JobKind, JobOutput, JobTag, ReplayRequest, WorkerEvent};
use ratatui_textarea::TextArea;
use std::collections::{BTreeMap, BTreeSet};

/// Reason tags offered in the tag picker, in key order (1..=9).
pub const DEFAULT_TAGS: [&str; 8] = [
    "incoherent",
    "repetitive",
    "narrates",
    "refuses",
    "off-persona",
    "weak-persona",
    "good-enactment",
    "other",
];

/// Rows moved by page-up/down.
pub const PAGE: usize = 10;

/// A message into `update`.
#[derive(Debug, Clone)]
pub enum Msg {
    /// Start-up: queue the model load and any missing generation.
    Init,
    /// A key press.
    Key(KeyChord),
    /// Pasted text (goes to an open editor).
    Paste(String),
    /// Something from the worker.
    Worker(WorkerEvent),
    /// Time passed; `now` is the wall-clock time (RFC 3339) for reports.
    Tick {
        /// Current time.
        now: String,
    },
    /// The terminal was resized.
    Resize,
}

/// Column the list is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// Generation order.
    Order,
    /// Tail perplexity.
    Perplexity,
    /// Repetition fraction.
    Repetition,
    /// KL rmse.
    KlRmse,
    /// Persona strength.
    Strength,
    /// Automatic verdict (drop first).
    Verdict,
    /// Human decision (undecided first).
    Decision,
}

impl SortKey {
    const CYCLE: [SortKey; 7] = [
        SortKey::Order,
        SortKey::Perplexity,
        SortKey::Repetition,
        SortKey::KlRmse,
        SortKey::Strength,
        SortKey::Verdict,
        SortKey::Decision,
    ];
    /// Label for the status line.
    pub fn label(self) -> &'static str {
        match self {
            SortKey::Order => "order",
            SortKey::Perplexity => "ppl",
            SortKey::Repetition => "rep",
            SortKey::KlRmse => "kl",
            SortKey::Strength => "persona",
            SortKey::Verdict => "filter",
            SortKey::Decision => "decision",
        }
    }
}

/// Which rows the list shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Everything.
    All,
    /// No human decision yet.
    Undecided,
    /// Accepted.
    Accepted,
    /// Rejected.
    Rejected,
    /// The filter keeps it.
    AutoKeep,
    /// The filter drops it.
    AutoDrop,
    /// Filter and human disagree.
    Disagree,
    /// The filter dropped it for this reason.
    Reason(ReasonKind),
}

impl Filter {
    const CYCLE: [Filter; 14] = [
        Filter::All,
        Filter::Undecided,
        Filter::Accepted,
        Filter::Rejected,
        Filter::AutoKeep,
        Filter::AutoDrop,
        Filter::Disagree,
        Filter::Reason(ReasonKind::Perplexity),
        Filter::Reason(ReasonKind::Repetition),
        Filter::Reason(ReasonKind::Narration),
        Filter::Reason(ReasonKind::Refusal),
        Filter::Reason(ReasonKind::Empty),
        Filter::Reason(ReasonKind::KlRmse),
        Filter::Reason(ReasonKind::WeakPersona),
    ];
    /// Label for the status line.
    pub fn label(self) -> String {
        match self {
            Filter::All => "all".into(),
            Filter::Undecided => "undecided".into(),
            Filter::Accepted => "accepted".into(),
            Filter::Rejected => "rejected".into(),
            Filter::AutoKeep => "filter keeps".into(),
            Filter::AutoDrop => "filter drops".into(),
            Filter::Disagree => "disagreements".into(),
            Filter::Reason(k) => format!("reason: {}", k.label()),
        }
    }
}

/// What the model is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelStatus {
    /// Not asked for yet.
    NotLoaded,
    /// Loading in the worker.
    Loading,
    /// Ready.
    Ready {
        /// Model id.
        model: String,
        /// Layers the round's vector steers.
        vector_layers: Vec<usize>,
    },
    /// Loading failed.
    Failed(String),
}

/// What an open editor edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditTarget {
    /// The note of a completion.
    Note,
    /// A prompt to generate from.
    Prompt,
    /// The researcher's note on the round shown on the heal screen (gate Q1).
    RoundNote,
}

/// An open popup (at most one; the help overlay is one too).
#[derive(Debug, Clone)]
pub enum Popup {
    /// Help overlay.
    Help {
        /// First visible line.
        scroll: u16,
    },
    /// Reason-tag picker with the tags ticked so far (0-based indices).
    Tags {
        /// Ticked tags.
        ticked: BTreeSet<usize>,
    },
    /// A text editor.
    Edit {
        /// What is edited.
        target: EditTarget,
        /// The completion it is about.
        completion: Option<String>,
        /// The editor.
        area: Box<TextArea<'static>>,
    },
    /// A yes/no question; `yes` runs on confirm.
    Confirm {
        /// The question.
        question: String,
        /// What confirming does.
        yes: Action,
    },
    /// Suggested thresholds and agreement.
    Stats,
    /// An error or information message.
    Message {
        /// Title.
        title: String,
        /// Body.
        text: String,
    },
}

/// A replay request and its streamed or finished result.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayView {
    /// The worker job.
    pub job: JobId,
    /// Completion id.
    pub completion: String,
    /// Rewind token.
    pub at: usize,
    /// Dose.
    pub dose: f64,
    /// Text streamed so far.
    pub streamed: String,
    /// The finished replay, once done.
    pub result: Option<Box<ScoredCompletion>>,
}

/// Progress of a running job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// What kind of job.
    pub tag: JobTag,
    /// Units done.
    pub done: u64,
    /// Units in all.
    pub total: u64,
    /// Detail.
    pub msg: String,
}

/// The blind re-show in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Reshow {
    /// Completion ids to show, in order.
    pub queue: Vec<String>,
    /// Position in the queue.
    pub pos: usize,
}

/// A screen over the gate-Q0 screen (which is always there, at the bottom); each owns its state.
#[derive(Debug, Clone, PartialEq)]
pub enum Screen {
    /// The blind re-show of decided completions.
    Reshow(Reshow),
    /// The rounds table and progress map (gate Q2).
    Iterate(iterate::IterateView),
    /// One round's heal: live curves, then its gate-Q1 report.
    Heal(iterate::HealView),
}

impl Screen {
    /// The key mode of the screen.
    pub fn mode(&self) -> Mode {
        match self {
            Screen::Reshow(_) => Mode::Reshow,
            Screen::Iterate(_) => Mode::Iterate,
            Screen::Heal(_) => Mode::Heal,
        }
    }
}

/// The stack of screens over gate Q0, bottom to top: at most one of each kind; opening one brings it to the top.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Screens(Vec<Screen>);

macro_rules! screen_access {
    ($get:ident, $get_mut:ident, $variant:ident, $ty:ty) => {
        /// That screen, wherever it is in the stack.
        pub fn $get(&self) -> Option<&$ty> {
            self.0.iter().find_map(|x| match x {
                Screen::$variant(v) => Some(v),
                _ => None,
            })
        }
        /// That screen, mutably.
        pub fn $get_mut(&mut self) -> Option<&mut $ty> {
            self.0.iter_mut().find_map(|x| match x {
                Screen::$variant(v) => Some(v),
                _ => None,
            })
        }
    };
}

impl Screens {
    screen_access!(reshow, reshow_mut, Reshow, Reshow);
    screen_access!(iterate, iterate_mut, Iterate, iterate::IterateView);
    screen_access!(heal, heal_mut, Heal, iterate::HealView);

    /// The screen on top, if any.
    pub fn top(&self) -> Option<&Screen> {
        self.0.last()
    }
    /// The key mode of the top screen (gate Q0 when none is open).
    pub fn mode(&self) -> Mode {
        self.top().map(Screen::mode).unwrap_or(Mode::GateQ0)
    }
    /// Open a screen on top (replacing one of its kind).
    pub fn open(&mut self, screen: Screen) {
        let mode = screen.mode();
        self.0.retain(|x| x.mode() != mode);
        self.0.push(screen);
    }
    /// Close the screen of this kind, if open.
    pub fn close(&mut self, mode: Mode) {
        self.0.retain(|x| x.mode() != mode);
    }
    /// Back to gate Q0.
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

/// A signal that ends the TUI as a quit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM.
    Term,
    /// SIGHUP (the terminal went away).
    Hup,
}

impl StopSignal {
    /// Its number (the exit status is 128 + it).
    pub fn number(self) -> u8 {
        match self {
            StopSignal::Term => 15,
            StopSignal::Hup => 1,
        }
    }
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Hup => "SIGHUP",
        }
    }
}

/// How a TUI session ended: anything but a clean quit with everything saved is a failure exit.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// Ended by this signal (exit 128 + its number).
    pub signal: Option<StopSignal>,
    /// The model never loaded: why.
    pub model_failed: Option<String>,
    /// Changes the disk refused (taken back off the screen when they failed).
    pub not_saved: usize,
}

/// Everything the UI knows. Views only read it.
pub struct State {
    /// The merged keymap.
    pub keymap: Keymap,
    /// Session name.
    pub session_name: String,
    /// Session settings.
    pub manifest: SessionManifest,
    /// The fold of the session's events, kept current by applying every event the UI records.
    pub session: SessionState,
    /// Round on screen.
    pub round: u32,
    /// The round's completions, in generation order.
    pub rows: Vec<ScoredCompletion>,
    /// Indices into `rows` after filter and sort.
    pub view: Vec<usize>,
    /// Selected position in `view`.
    pub selected: usize,
    /// Sort column.
    pub sort: SortKey,
    /// Sort descending.
    pub sort_desc: bool,
    /// Row filter.
    pub filter: Filter,
    /// Token cursor in the selected completion.
    pub cursor: usize,
    /// Detail pane scroll.
    pub detail_scroll: u16,
    /// Open popup.
    pub popup: Option<Popup>,
    /// Keys of an unfinished sequence.
    pub pending_keys: Vec<KeyChord>,
    /// Dose slider, as a multiple of the round's c* (replays run at `dose × c*`).
    pub dose: f64,
    /// Last dose written to the log.
    pub dose_recorded: f64,
    /// Ticks since the slider last moved.
    pub dose_idle_ticks: u32,
    /// Tags chosen for undecided completions (attached at decision time).
    pub pending_tags: BTreeMap<String, Vec<String>>,
    /// Notes written on undecided completions (attached at decision time).
    pub pending_notes: BTreeMap<String, String>,
    /// Current replay.
    pub replay: Option<ReplayView>,
    /// Model status.
    pub model: ModelStatus,
    /// Running jobs.
    pub jobs: BTreeMap<JobId, JobView>,
    /// Prompt indices being generated.
    pub generating: BTreeSet<usize>,
    /// Live text of the generation in progress `(job, row → text)`.
    pub live: Option<(JobId, BTreeMap<usize, String>)>,
    /// Next job id.
    pub next_job: JobId,
    /// One-line status message (cleared after a few seconds).
    pub status: String,
    /// The status as of the last tick, and for how many ticks it has been shown.
    pub status_age: (String, u32),
    /// Problems found while opening the session.
    pub warnings: Vec<String>,
    /// The screens over the gate-Q0 screen, bottom to top (re-show, iterate, heal); the top one has the keys.
    pub screens: Screens,
    /// Reason tags offered.
    pub tags: Vec<String>,
    /// Wall-clock time of the last tick.
    pub now: String,
    /// Set when the app should exit.
    pub quit: bool,
    /// The rounds job in progress (preparing, healing or evaluating a round), if any.
    pub loop_job: Option<JobId>,
    /// A gate was recorded while `loop_job` ran: run the loop again if that run ends waiting at a gate.
    pub resume_after_run: bool,
    /// The session's folder layout (for the paths the UI names in events).
    pub layout: SessionDir,
    /// Heal steps streamed by the running rounds job (the heal screen's live chart).
    pub heal_training: Option<iterate::HealTraining>,
    /// The signal that ended the session, for the exit status.
    pub signal: Option<StopSignal>,
    /// Appends that failed (each was taken back off the screen), for the exit status.
    pub not_saved: usize,
    /// Events shown on screen but not yet confirmed on disk, by the job appending them. When one fails the
    /// screen is re-read from the log, so it never shows a decision that was not saved.
    pub saving: BTreeMap<JobId, SessionEvent>,
}

impl State {
    /// A state for a session: its settings, folded events and current round's completions.
    pub fn new(
        keymap: Keymap,
        session_name: &str,
        manifest: SessionManifest,
        session: SessionState,
        rows: Vec<ScoredCompletion>,
    ) -> Self {
        let round = session.current_round;
        let dose = session.round().map(|r| r.dose).unwrap_or(1.0);
        let mut s = State {
            keymap,
            session_name: session_name.to_string(),
            loop_job: None,
            resume_after_run: false,
            layout: SessionDir::new(std::path::Path::new(".")),
            manifest,
            session,
            round,
            rows,
            view: vec![],
            selected: 0,
            sort: SortKey::Order,
            sort_desc: false,
            filter: Filter::All,
            cursor: 0,
            detail_scroll: 0,
            popup: None,
            pending_keys: vec![],
            dose,
            dose_recorded: dose,
            dose_idle_ticks: 0,
            pending_tags: BTreeMap::new(),
            pending_notes: BTreeMap::new(),
            replay: None,
            model: ModelStatus::NotLoaded,
            jobs: BTreeMap::new(),
            generating: BTreeSet::new(),
            live: None,
            next_job: 1,
            status: String::new(),
            status_age: (String::new(), 0),
            warnings: vec![],
            screens: Screens::default(),
            tags: DEFAULT_TAGS.iter().map(|s| s.to_string()).collect(),
            now: String::new(),
            quit: false,
            heal_training: None,
            saving: BTreeMap::new(),
            signal: None,
            not_saved: 0,
        };
        s.refresh_view(None);
        s
    }

    /// How the session ended, for the process's exit status.
    pub fn outcome(&self) -> Outcome {
        Outcome {
            signal: self.signal,
            model_failed: match &self.model {
                ModelStatus::Failed(e) => Some(e.clone()),
                _ => None,
            },
            not_saved: self.not_saved,
        }
    }

    /// The mode that decides what keys mean.
    pub fn mode(&self) -> Mode {
        match &self.popup {
            Some(Popup::Help { .. }) => Mode::Help,
            Some(Popup::Tags { .. }) => Mode::Tags,
            Some(Popup::Edit { .. }) => Mode::Edit,
            Some(Popup::Confirm { .. }) => Mode::Confirm,
            Some(Popup::Stats) => Mode::Stats,
            Some(Popup::Message { .. }) => Mode::Message,
            None => self.screens.mode(),
        }
    }

    /// The round's state in the fold.
    pub fn round_state(&self) -> Option<&RoundState> {
        self.session.rounds.get(&self.round)
    }

    /// The selected row.
    pub fn current(&self) -> Option<&ScoredCompletion> {
        self.view.get(self.selected).and_then(|i| self.rows.get(*i))
    }

    /// The selected completion's id.
    pub fn current_id(&self) -> Option<String> {
        self.current().map(|r| r.completion.id.clone())
    }

    /// The human decision on a completion: `Some(true)` accepted.
    pub fn decision(&self, id: &str) -> Option<bool> {
        self.round_state().and_then(|r| r.decision(id)).map(|d| d.keep)
    }

    /// Tags of a completion: its decision's, else the pending ones.
    pub fn tags_of(&self, id: &str) -> Vec<String> {
        match self.round_state().and_then(|r| r.decision(id)) {
            Some(d) => d.tags.clone(),
            None => self.pending_tags.get(id).cloned().unwrap_or_default(),
        }
    }

    /// Note of a completion: its decision's, else the pending one.
    pub fn note_of(&self, id: &str) -> Option<String> {
        match self.round_state().and_then(|r| r.decision(id)) {
            Some(d) => d.note.clone(),
            None => self.pending_notes.get(id).cloned(),
        }
    }

    /// Number of completions the round has or is about to have: those written so far plus the custom prompts
    /// being generated (the walk-down decides how many batches the loop generates).
    pub fn planned(&self) -> usize {
        let g = &self.manifest.generation;
        let per_prompt = g.alphas.len() * g.samples_per_alpha.max(1);
        let written =
            self.round_state().map(|r| r.completion_files.iter().map(|f| f.ids.len()).sum()).unwrap_or(0);
        written + self.generating.len() * per_prompt
    }

    /// Largest slider value (a multiple of c*).
    pub fn dose_max(&self) -> f64 {
        self.manifest.ui.dose_max_factor.max(self.manifest.ui.dose_step)
    }

    /// The round's calibrated coefficient c* (0 before the round started).
    pub fn c_star(&self) -> f64 {
        self.round_state().map(|r| r.base_dose).unwrap_or(0.0)
    }

    /// The absolute dose the slider stands for: `dose × c*`.
    pub fn applied_dose(&self) -> f64 {
        self.dose * self.c_star()
    }

    fn job_id(&mut self) -> JobId {
        let id = self.next_job;
        self.next_job += 1;
        id
    }

    fn job(&mut self, kind: JobKind) -> Job {
        Job { id: self.job_id(), kind }
    }

    /// Apply an event to the in-memory fold and return the job that appends it.
    fn record(&mut self, e: SessionEvent) -> Job {
        let kind = JobKind::Record(e);
        self.save(kind)
    }

    /// Show an append (`Record` or `WriteArtifact`) on screen now and remember it until the disk confirms it.
    fn save(&mut self, kind: JobKind) -> Job {
        let job = self.job(kind);
        if let JobKind::Record(e) | JobKind::WriteArtifact { event: e, .. } = &job.kind {
            apply_event(&mut self.session, e);
            self.saving.insert(job.id, e.clone());
        }
        job
    }

    fn sort_value(&self, r: &ScoredCompletion) -> f64 {
        let s = &r.score;
        match self.sort {
            SortKey::Order => 0.0,
            SortKey::Perplexity => s.perplexity.unwrap_or(f64::INFINITY),
            SortKey::Repetition => s.repetition,
            SortKey::KlRmse => s.kl_rmse,
            SortKey::Strength => s.persona_strength.unwrap_or(f64::NEG_INFINITY),
            SortKey::Verdict => match s.verdict {
                Verdict::Drop => 0.0,
                Verdict::Keep => 1.0,
            },
            SortKey::Decision => match self.decision(&r.completion.id) {
                None => 0.0,
                Some(false) => 1.0,
                Some(true) => 2.0,
            },
        }
    }

    fn passes(&self, r: &ScoredCompletion) -> bool {
        let d = self.decision(&r.completion.id);
        let auto_keep = r.score.verdict == Verdict::Keep;
        match self.filter {
            Filter::All => true,
            Filter::Undecided => d.is_none(),
            Filter::Accepted => d == Some(true),
            Filter::Rejected => d == Some(false),
            Filter::AutoKeep => auto_keep,
            Filter::AutoDrop => !auto_keep,
            Filter::Disagree => d.is_some_and(|k| k != auto_keep),
            Filter::Reason(k) => r.score.has_reason(k),
        }
    }

    /// Recompute the filtered, sorted view, keeping `keep` (or the current row) selected when visible.
    pub fn refresh_view(&mut self, keep: Option<String>) {
        let keep = keep.or_else(|| self.current_id());
        let mut v: Vec<usize> = (0..self.rows.len()).filter(|i| self.passes(&self.rows[*i])).collect();
        if self.sort != SortKey::Order {
            v.sort_by(|a, b| {
                let (x, y) = (self.sort_value(&self.rows[*a]), self.sort_value(&self.rows[*b]));
                x.total_cmp(&y).then(a.cmp(b))
            });
        }
        if self.sort_desc {
            v.reverse();
        }
        self.view = v;
        if let Some(id) = keep {
            if let Some(p) = self.view.iter().position(|i| self.rows[*i].completion.id == id) {
                self.selected = p;
                return;
            }
        }
        self.selected = self.selected.min(self.view.len().saturating_sub(1));
    }

    fn select(&mut self, pos: usize) {
        let pos = pos.min(self.view.len().saturating_sub(1));
        if pos != self.selected {
            self.selected = pos;
            self.cursor = 0;
            self.detail_scroll = 0;
        }
    }

    fn message(&mut self, title: &str, text: impl Into<String>) {
        self.popup = Some(Popup::Message { title: title.into(), text: text.into() });
    }

    fn sampling(&self) -> Sampling {
        self.manifest.generation.sampling()
    }

    fn generate_request(&self, prompt_index: usize, custom_index: usize, prompt: String) -> GenerateRequest {
        let g = &self.manifest.generation;
        GenerateRequest {
            round: self.round,
            prompt_index,
            custom_index,
            system: g.system_prompt.clone(),
            prompt,
            alphas: g.alphas.clone(),
            samples_per_alpha: g.samples_per_alpha,
            sampling: self.sampling(),
            kl_window: g.kl_window,
        }
    }
}

/// The single entry point: apply a message, return the jobs it causes.
pub fn update(s: &mut State, msg: Msg) -> Vec<Job> {
    match msg {
        Msg::Init => init(s),
        Msg::Key(k) => on_key(s, k),
        Msg::Paste(text) => {
            if let Some(Popup::Edit { area, .. }) = &mut s.popup {
                area.insert_str(text);
            }
            vec![]
        }
        Msg::Worker(e) => on_worker(s, e),
        Msg::Tick { now } => on_tick(s, now),
        Msg::Resize => vec![],
    }
}

fn init(s: &mut State) -> Vec<Job> {
    let mut jobs = Vec::new();
    let lin = &s.session.lineage;
    let next = crate::rounds::Runner::round_in_progress(lin);
    let started = lin.done.contains_key(&next) || s.session.rounds.get(&next).is_some_and(|r| r.started);
    // A session with a round in progress (or none yet) goes on with it; one whose rounds are all judged waits on
    // the iterate screen for `continue`.
    if s.model == ModelStatus::NotLoaded {
        if !lin.verdicts.is_empty() && !started {
            let in_progress = next;
            s.status = format!("round {} is judged; continue starts round {in_progress}", in_progress - 1);
            jobs.extend(iterate::open(s));
        } else {
            jobs.extend(run_loop(s));
        }
    }
    if !s.warnings.is_empty() {
        let text = s.warnings.join("\n");
        s.message("Session opened with warnings", text);
    }
    jobs
}

/// Run the loop on to the next gate it needs (or the next round); the worker loads the model first when it has
/// none.
pub fn run_loop(s: &mut State) -> Vec<Job> {
    if s.loop_job.is_some() {
        s.status = "a round is already running".into();
        return vec![];
    }
    if s.model == ModelStatus::NotLoaded {
        s.model = ModelStatus::Loading;
    }
    let job = s.job(JobKind::RunRounds { rounds: None });
    s.loop_job = Some(job.id);
    vec![job]
}

/// Ticks a status message stays up (the loop ticks every 250 ms).
pub const STATUS_TICKS: u32 = 16;

fn on_tick(s: &mut State, now: String) -> Vec<Job> {
    s.now = now;
    if s.status == s.status_age.0 {
        s.status_age.1 += 1;
        if s.status_age.1 >= STATUS_TICKS {
            s.status.clear();
        }
    } else {
        s.status_age = (s.status.clone(), 0);
    }
    s.dose_idle_ticks = s.dose_idle_ticks.saturating_add(1);
    // Record the slider once it has rested, not on every key repeat.
    if s.dose_idle_ticks >= 2 && s.dose != s.dose_recorded {
        return vec![flush_dose(s)];
    }
    vec![]
}

fn flush_dose(s: &mut State) -> Job {
    s.dose_recorded = s.dose;
    let e = SessionEvent::DoseChanged { round: s.round, dose: s.dose };
    s.record(e)
}

/// Translate a key to text-editor input.
fn textarea_input(k: KeyChord) -> ratatui_textarea::Input {
    use ratatui_textarea::Key;
    let key = match k.code {
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Tab | KeyCode::BackTab => Key::Tab,
        KeyCode::Backspace => Key::Backspace,
        KeyCode::Delete => Key::Delete,
        KeyCode::Home => Key::Home,
        KeyCode::End => Key::End,
        KeyCode::PageUp => Key::PageUp,
        KeyCode::PageDown => Key::PageDown,
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::Left => Key::Left,
        KeyCode::Right => Key::Right,
        KeyCode::F(n) => Key::F(n),
        KeyCode::Insert => Key::Null,
    };
    ratatui_textarea::Input { key, ctrl: k.ctrl, alt: k.alt, shift: k.shift }
}

fn on_key(s: &mut State, k: KeyChord) -> Vec<Job> {
    let mode = s.mode();
    let mut res = s.keymap.resolve(mode, &s.pending_keys, k);
    if res == KeyResult::NotFound && !s.pending_keys.is_empty() {
        // An unfinished sequence followed by an unrelated key: drop the sequence, take the key alone.
        s.pending_keys.clear();
        res = s.keymap.resolve(mode, &[], k);
    }
    match res {
        KeyResult::Matched(a) => {
            s.pending_keys.clear();
            on_action(s, a)
        }
        KeyResult::Pending => {
            s.pending_keys.push(k.normalised());
            vec![]
        }
        KeyResult::NotFound => {
            if let Some(Popup::Edit { area, .. }) = &mut s.popup {
                area.input(textarea_input(k));
            }
            vec![]
        }
    }
}

/// Apply an action in the current mode.
pub fn on_action(s: &mut State, a: Action) -> Vec<Job> {
    match s.mode() {
        Mode::Help => help_action(s, a),
        Mode::Tags => tags_action(s, a),
        Mode::Edit => edit_action(s, a),
        Mode::Confirm => confirm_action(s, a),
        Mode::Stats | Mode::Message => {
            if matches!(a, Action::Quit) {
                return quit(s);
            }
            if matches!(a, Action::ToggleHelp) {
                s.popup = Some(Popup::Help { scroll: 0 });
            } else {
                s.popup = None;
            }
            vec![]
        }
        Mode::Reshow => reshow_action(s, a),
        Mode::Iterate => iterate::action(s, a),
        Mode::Heal => iterate::heal_action(s, a),
        Mode::GateQ0 | Mode::Global => gate_action(s, a),
    }
}

fn quit(s: &mut State) -> Vec<Job> {
    s.quit = true;
    let mut jobs = Vec::new();
    if s.dose != s.dose_recorded {
        jobs.push(flush_dose(s));
    }
    jobs
}

fn help_action(s: &mut State, a: Action) -> Vec<Job> {
    match a {
        Action::ToggleHelp | Action::Cancel => s.popup = None,
        Action::ScrollDown => {
            if let Some(Popup::Help { scroll }) = &mut s.popup {
                *scroll = scroll.saturating_add(1);
            }
        }
        Action::ScrollUp => {
            if let Some(Popup::Help { scroll }) = &mut s.popup {
                *scroll = scroll.saturating_sub(1);
            }
        }
        Action::Quit => return quit(s),
        _ => {}
    }
    vec![]
}

fn tags_action(s: &mut State, a: Action) -> Vec<Job> {
    match a {
        Action::ToggleTag(n) => {
            let i = n as usize - 1;
            if i < s.tags.len() {
                if let Some(Popup::Tags { ticked }) = &mut s.popup {
                    if !ticked.remove(&i) {
                        ticked.insert(i);
                    }
                }
            }
            vec![]
        }
        Action::Confirm => {
            let ticked = match s.popup.take() {
                Some(Popup::Tags { ticked }) => ticked,
                _ => return vec![],
            };
            let tags: Vec<String> = ticked.iter().filter_map(|i| s.tags.get(*i).cloned()).collect();
            set_annotation(s, Some(tags), None)
        }
        Action::Cancel => {
            s.popup = None;
            vec![]
        }
        Action::Quit => quit(s),
        Action::ToggleHelp => {
            s.popup = Some(Popup::Help { scroll: 0 });
            vec![]
        }
        _ => vec![],
    }
}

/// Change tags and/or the note of the current completion: re-record its decision when it has one (undoable),
/// else keep them pending until it is decided.
fn set_annotation(s: &mut State, tags: Option<Vec<String>>, note: Option<Option<String>>) -> Vec<Job> {
    let Some(id) = s.current_id() else { return vec![] };
    let existing = s.round_state().and_then(|r| r.decision(&id)).cloned();
    match existing {
        Some(d) => {
            let new_tags = tags.unwrap_or(d.tags.clone());
            let new_note = note.unwrap_or(d.note.clone());
            if new_tags == d.tags && new_note == d.note {
                return vec![];
            }
            let e = SessionEvent::Decision {
                round: s.round,
                completion: id,
                decision: if d.keep { DecisionKind::Accept } else { DecisionKind::Reject },
                tags: new_tags,
                note: new_note,
            };
            vec![s.record(e)]
        }
        None => {
            if let Some(t) = tags {
                s.pending_tags.insert(id.clone(), t);
            }
            if let Some(n) = note {
                match n {
                    Some(n) => s.pending_notes.insert(id, n),
                    None => s.pending_notes.remove(&id),
                };
            }
            s.status = "tags and note are saved with the decision".into();
            vec![]
        }
    }
}

fn edit_action(s: &mut State, a: Action) -> Vec<Job> {
    match a {
        Action::Cancel => {
            s.popup = None;
            vec![]
        }
        Action::Quit => quit(s),
        Action::SaveEdit => {
            let Some(Popup::Edit { target, completion, area }) = s.popup.take() else { return vec![] };
            let text = area.lines().join("\n").trim().to_string();
            match target {
                EditTarget::Note => {
                    if completion != s.current_id() {
                        return vec![];
                    }
                    set_annotation(s, None, Some((!text.is_empty()).then_some(text)))
                }
                EditTarget::RoundNote => {
                    if let Some(h) = s.screens.heal_mut() {
                        h.note = text;
                    }
                    vec![]
                }
                EditTarget::Prompt => {
                    if text.is_empty() {
                        s.status = "empty prompt: nothing generated".into();
                        return vec![];
                    }
                    let used = s.round_state().map(|r| r.generated_prompts()).unwrap_or_default();
                    let base = s.manifest.generation.prompts.len();
                    let next = used
                        .iter()
                        .chain(s.generating.iter())
                        .copied()
                        .filter(|i| *i >= base)
                        .max()
                        .map(|m| m + 1)
                        .unwrap_or(base);
                    if !matches!(s.model, ModelStatus::Ready { .. }) {
                        s.status = "the model is not ready yet; try again when the round is generated".into();
                        return vec![];
                    }
                    s.generating.insert(next);
                    s.status = format!("generating from your prompt (p{next:03})");
                    let req = s.generate_request(next, next - base, text);
                    vec![s.job(JobKind::Generate(Box::new(req)))]
                }
            }
        }
        _ => vec![],
    }
}

fn confirm_action(s: &mut State, a: Action) -> Vec<Job> {
    match a {
        Action::Confirm => {
            let Some(Popup::Confirm { yes, .. }) = s.popup.take() else { return vec![] };
            match yes {
                Action::PassGate => write_gate(s, true),
                Action::Quit => quit(s),
                _ => vec![],
            }
        }
        Action::Cancel => {
            s.popup = None;
            vec![]
        }
        _ => vec![],
    }
}

fn write_gate(s: &mut State, passed: bool) -> Vec<Job> {
    let md = stats::gate_markdown(s, passed);
    let rel = s.layout.round(s.round).gate_q0().rel;
    let event = SessionEvent::GateWritten { round: s.round, gate: Gate::Q0, file: rel.clone(), passed };
    s.status = if passed {
        format!("gate Q0 passed; wrote {rel}; healing round {} on the accepted completions", s.round)
    } else {
        format!("wrote {rel}")
    };
    // Passing the gate resumes the loop (heal) once the gate is on disk: see `on_output`'s `Recorded`.
    vec![s.save(JobKind::WriteArtifact { rel, contents: md.into_bytes(), event })]
}

fn reshow_action(s: &mut State, a: Action) -> Vec<Job> {
    match a {
        Action::Accept | Action::Reject => {
            let Some(rs) = s.screens.reshow_mut() else { return vec![] };
            let Some(id) = rs.queue.get(rs.pos).cloned() else { return vec![] };
            rs.pos += 1;
            let finished = rs.pos >= rs.queue.len();
            let decision = if a == Action::Accept { DecisionKind::Accept } else { DecisionKind::Reject };
            let job = s.record(SessionEvent::Reshown { round: s.round, completion: id, decision });
            if finished {
                s.screens.close(Mode::Reshow);
                let k = stats::kappa(s);
                let text = match k.kappa {
                    Some(v) => format!(
                        "{} items re-shown in all; {} got the same decision.\nCohen's kappa: {v:.2}",
                        k.n, k.same
                    ),
                    None => format!(
                        "{} items re-shown in all; {} got the same decision.\nCohen's kappa is undefined (one label only).",
                        k.n, k.same
                    ),
                };
                s.message("Blind re-show finished", text);
            }
            vec![job]
        }
        Action::Cancel => {
            s.screens.close(Mode::Reshow);
            s.status = "re-show stopped".into();
            vec![]
        }
        Action::ScrollDown => {
            s.detail_scroll = s.detail_scroll.saturating_add(1);
            vec![]
        }
        Action::ScrollUp => {
            s.detail_scroll = s.detail_scroll.saturating_sub(1);
            vec![]
        }
        Action::Quit => quit(s),
        Action::ToggleHelp => {
            s.popup = Some(Popup::Help { scroll: 0 });
            vec![]
        }
        _ => vec![],
    }
}

/// A text editor holding `text` with the cursor at its end.
pub(crate) fn editor(text: &str) -> TextArea<'static> {
    let mut area = TextArea::new(text.lines().map(String::from).collect());
    area.move_cursor(ratatui_textarea::CursorMove::Bottom);
    area.move_cursor(ratatui_textarea::CursorMove::End);
    area
}

/// A deterministic sample of decided completions not yet re-shown (SplitMix-style hash order, so the sample
/// does not follow the list order the researcher remembers).
pub fn reshow_sample(s: &State, n: usize) -> Vec<String> {
    let Some(r) = s.round_state() else { return vec![] };
    let shown: BTreeSet<&str> = r.reshown.iter().map(|(id, _)| id.as_str()).collect();
    let mut ids: Vec<(u64, String)> = r
        .decisions()
        .keys()
        .filter(|id| !shown.contains(*id))
        .map(|id| {
            let mut h: u64 = 0x9E37_79B9_7F4A_7C15 ^ (r.history.len() as u64);
            for b in id.bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01B3);
            }
            h ^= h >> 31;
            (h.wrapping_mul(0xBF58_476D_1CE4_E5B9), id.to_string())
        })
        .collect();
    ids.sort();
    ids.into_iter().take(n).map(|(_, id)| id).collect()
}

fn decide(s: &mut State, keep: bool) -> Vec<Job> {
    let Some(id) = s.current_id() else { return vec![] };
    if s.decision(&id) == Some(keep) {
        s.status = format!("{id} is already {}", if keep { "accepted" } else { "rejected" });
        advance_after_decision(s);
        return vec![];
    }
    let (tags, note) = match s.round_state().and_then(|r| r.decision(&id)) {
        Some(d) => (d.tags.clone(), d.note.clone()),
        None => (s.pending_tags.remove(&id).unwrap_or_default(), s.pending_notes.remove(&id)),
    };
    let e = SessionEvent::Decision {
        round: s.round,
        completion: id.clone(),
        decision: if keep { DecisionKind::Accept } else { DecisionKind::Reject },
        tags,
        note,
    };
    let job = s.record(e);
    s.status = format!("{} {id}", if keep { "accepted" } else { "rejected" });
    s.refresh_view(Some(id.clone()));
    // Under a filter that now hides the row, the list has already moved on to the next one.
    if s.current_id().as_deref() == Some(id.as_str()) {
        advance_after_decision(s);
    }
    vec![job]
}

/// After a decision: the next undecided row below, else stay.
fn advance_after_decision(s: &mut State) {
    let n = s.view.len();
    for off in 1..n {
        let p = s.selected + off;
        if p >= n {
            break;
        }
        let id = s.rows[s.view[p]].completion.id.clone();
        if s.decision(&id).is_none() {
            s.select(p);
            return;
        }
    }
}

fn next_undecided(s: &mut State) {
    let n = s.view.len();
    for off in 1..=n {
        let p = (s.selected + off) % n.max(1);
        if let Some(i) = s.view.get(p) {
            if s.decision(&s.rows[*i].completion.id).is_none() {
                s.select(p);
                return;
            }
        }
    }
    s.status = "every completion in view is decided".into();
}

fn start_replay(s: &mut State) -> Vec<Job> {
    if !matches!(s.model, ModelStatus::Ready { .. }) {
        s.status = "the model is not loaded yet".into();
        return vec![];
    }
    let Some(row) = s.current().cloned() else { return vec![] };
    let at = s.cursor.min(row.completion.tokens.len());
    let dose = s.applied_dose();
    let req = ReplayRequest {
        round: s.round,
        completion: row.completion.clone(),
        at,
        dose,
        sampling: s.sampling(),
        kl_window: s.manifest.generation.kl_window,
    };
    let job = s.job(JobKind::Replay(Box::new(req)));
    s.replay = Some(ReplayView {
        job: job.id,
        completion: row.completion.id.clone(),
        at,
        dose,
        streamed: String::new(),
        result: None,
    });
    s.status = format!(
        "replaying {} from token {at} at dose {dose:.2} ({:.2} × c* {:.2})",
        row.completion.id,
        s.dose,
        s.c_star()
    );
    vec![job]
}

fn change_dose(s: &mut State, up: bool) -> Vec<Job> {
    let step = s.manifest.ui.dose_step;
    let raw = if up { s.dose + step } else { s.dose - step };
    // Snap to the step grid so repeated presses do not accumulate float error.
    let snapped = ((raw / step).round() * step).clamp(0.0, s.dose_max());
    s.dose = (snapped * 1e6).round() / 1e6;
    s.dose_idle_ticks = 0;
    // A replay on screen follows the slider (the worker keeps only the latest request).
    let follows = s.replay.as_ref().is_some_and(|r| Some(&r.completion) == s.current_id().as_ref());
    if follows {
        if let Some(r) = &s.replay {
            s.cursor = r.at;
        }
        return start_replay(s);
    }
    vec![]
}

fn gate_action(s: &mut State, a: Action) -> Vec<Job> {
    let ntok = s.current().map(|r| r.completion.tokens.len()).unwrap_or(0);
    match a {
        Action::Quit => return quit(s),
        Action::ToggleHelp => s.popup = Some(Popup::Help { scroll: 0 }),
        Action::OpenIterate => return iterate::open(s),
        Action::Accept => return decide(s, true),
        Action::Reject => return decide(s, false),
        Action::Undo => {
            let Some(last) = s.round_state().and_then(|r| r.history.last()).cloned() else {
                s.status = "nothing to undo".into();
                return vec![];
            };
            let e = SessionEvent::Decision {
                round: s.round,
                completion: last.completion.clone(),
                decision: DecisionKind::Undo,
                tags: vec![],
                note: None,
            };
            let job = s.record(e);
            s.status =
                format!("undid {} of {}", if last.keep { "accept" } else { "reject" }, last.completion);
            // Show what was undone, even if the filter had hidden it.
            s.refresh_view(Some(last.completion.clone()));
            if s.current_id().as_deref() != Some(last.completion.as_str()) {
                s.filter = Filter::All;
                s.refresh_view(Some(last.completion));
            }
            return vec![job];
        }
        Action::NextCompletion => s.select(s.selected + 1),
        Action::PrevCompletion => s.select(s.selected.saturating_sub(1)),
        Action::FirstCompletion => s.select(0),
        Action::LastCompletion => s.select(s.view.len().saturating_sub(1)),
        Action::PageDown => s.select(s.selected + PAGE),
        Action::PageUp => s.select(s.selected.saturating_sub(PAGE)),
        Action::NextUndecided => next_undecided(s),
        Action::TagReasons => {
            if let Some(id) = s.current_id() {
                let have = s.tags_of(&id);
                let ticked =
                    s.tags.iter().enumerate().filter(|(_, t)| have.contains(t)).map(|(i, _)| i).collect();
                s.popup = Some(Popup::Tags { ticked });
            }
        }
        Action::EditNote => {
            if let Some(id) = s.current_id() {
                let note = s.note_of(&id).unwrap_or_default();
                let area = editor(&note);
                s.popup = Some(Popup::Edit {
                    target: EditTarget::Note,
                    completion: Some(id),
                    area: Box::new(area),
                });
            }
        }
        Action::EditPrompt => {
            let prompt = s
                .current()
                .map(|r| r.completion.prompt.clone())
                .or_else(|| s.manifest.generation.prompts.first().cloned())
                .unwrap_or_default();
            let area = editor(&prompt);
            s.popup =
                Some(Popup::Edit { target: EditTarget::Prompt, completion: None, area: Box::new(area) });
        }
        Action::DoseUp => return change_dose(s, true),
        Action::DoseDown => return change_dose(s, false),
        Action::CursorLeft => s.cursor = s.cursor.saturating_sub(1),
        Action::CursorRight => s.cursor = (s.cursor + 1).min(ntok.saturating_sub(1)),
        Action::CursorStart => s.cursor = 0,
        Action::CursorEnd => s.cursor = ntok.saturating_sub(1),
        Action::JumpToDrift => {
            if let Some(r) = s.current() {
                let t = &r.completion.trace;
                let trace = if t.kl_window_rmse.len() == ntok { &t.kl_window_rmse } else { &t.kl };
                if let Some((i, _)) = trace.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)) {
                    // Start of the window that peaks: where the drift began.
                    let w = s.manifest.generation.kl_window.max(1);
                    s.cursor = (i + 1).saturating_sub(w);
                }
            }
        }
        Action::Backtrack => return start_replay(s),
        Action::AdoptReplay => return adopt_replay(s),
        Action::DiscardReplay => {
            if let Some(r) = s.replay.take() {
                s.status = "replay discarded".into();
                if r.result.is_none() {
                    return vec![s.job(JobKind::Cancel(r.job))];
                }
            }
        }
        Action::CycleSort => {
            let i = SortKey::CYCLE.iter().position(|k| *k == s.sort).unwrap_or(0);
            s.sort = SortKey::CYCLE[(i + 1) % SortKey::CYCLE.len()];
            s.refresh_view(None);
        }
        Action::ReverseSort => {
            s.sort_desc = !s.sort_desc;
            s.refresh_view(None);
        }
        Action::CycleFilter => {
            let i = Filter::CYCLE.iter().position(|f| *f == s.filter).unwrap_or(0);
            s.filter = Filter::CYCLE[(i + 1) % Filter::CYCLE.len()];
            s.refresh_view(None);
        }
        Action::ClearFilter => {
            s.filter = Filter::All;
            s.refresh_view(None);
        }
        Action::ToggleStats => s.popup = Some(Popup::Stats),
        Action::WriteGate => return write_gate(s, false),
        Action::PassGate => {
            let p = stats::progress(s);
            s.popup = Some(Popup::Confirm {
                question: format!(
                    "Pass gate Q0 for round {} with {} of {} decided ({} accepted)?\nThis writes {} and heals the \
                     round on the accepted completions.",
                    s.round,
                    p.decided,
                    p.total,
                    p.kept,
                    s.layout.round(s.round).gate_q0().rel
                ),
                yes: Action::PassGate,
            });
        }
        Action::StartReshow => {
            let queue = reshow_sample(s, s.manifest.ui.reshow_sample);
            if queue.is_empty() {
                s.message("Blind re-show", "No decided completions left to re-show. Decide some first.");
            } else {
                s.status = format!("blind re-show of {} completions", queue.len());
                s.screens.open(Screen::Reshow(Reshow { queue, pos: 0 }));
                s.detail_scroll = 0;
            }
        }
        Action::Rescore => {
            let completions: Vec<_> = s.rows.iter().map(|r| r.completion.clone()).collect();
            if completions.is_empty() {
                return vec![];
            }
            s.status = "rescoring with the session's pattern files".into();
            let round = s.round;
            return vec![s.job(JobKind::Rescore { round, completions })];
        }
        Action::ScrollDown => s.detail_scroll = s.detail_scroll.saturating_add(1),
        Action::ScrollUp => s.detail_scroll = s.detail_scroll.saturating_sub(1),
        Action::ToggleTag(_)
        | Action::Confirm
        | Action::Cancel
        | Action::SaveEdit
        | Action::ContinueRounds
        | Action::StopRounds
        | Action::RollbackRound
        | Action::ForkRound
        | Action::NextRound
        | Action::PrevRound
        | Action::NextSample
        | Action::PrevSample
        | Action::OpenHeal
        | Action::KeepRound
        | Action::DropRound => {}
    }
    vec![]
}

fn adopt_replay(s: &mut State) -> Vec<Job> {
    let Some(r) = s.replay.as_ref() else {
        s.status = "no replay to adopt".into();
        return vec![];
    };
    let Some(row) = r.result.clone() else {
        s.status = "the replay is still running".into();
        return vec![];
    };
    let (id, at, dose) = (r.completion.clone(), r.at, r.dose);
    let Some(i) = s.rows.iter().position(|x| x.completion.id == id) else { return vec![] };
    let n = s.round_state().map(|r| r.replays.iter().filter(|x| x.completion == id).count()).unwrap_or(0);
    let rel = s.layout.round(s.round).replay(&id, n + 1).rel;
    let contents = match serde_json::to_vec_pretty(&*row) {
        Ok(c) => c,
        Err(e) => {
            s.message("Could not save the replay", e.to_string());
            return vec![];
        }
    };
    let event =
        SessionEvent::ReplayAdopted { round: s.round, completion: id.clone(), file: rel.clone(), at, dose };
    s.rows[i] = *row;
    s.replay = None;
    s.cursor = at;
    s.refresh_view(Some(id.clone()));
    s.status = format!("{id} replaced by its replay from token {at} at dose {dose:.2}");
    vec![s.save(JobKind::WriteArtifact { rel, contents, event })]
}

/// Show an error popup; one already open stays on top (the first failure is usually the cause of the next).
fn error_popup(s: &mut State, title: &str, text: String) {
    match &mut s.popup {
        // A failure or a warning already on screen stays: the new one goes below it.
        Some(Popup::Message { title: t, text: body }) if t.starts_with("Failed") || t.contains("warning") => {
            body.push_str(&format!("\n\nthen, {}: {text}", title.to_lowercase()));
        }
        _ => s.message(title, text),
    }
}

/// A round began generating: the gate-Q0 screen moves to it.
fn on_round_started(s: &mut State, round: u32, c_star: f64) {
    let vector = Some(s.layout.round(round).vector().rel);
    if !s.session.rounds.get(&round).is_some_and(|r| r.started) {
        apply_event(&mut s.session, &SessionEvent::RoundStarted { round, dose: c_star, vector });
    }
    if round != s.round {
        s.round = round;
        s.rows.clear();
        s.replay = None;
        s.screens.close(Mode::Reshow);
        s.selected = 0;
        s.cursor = 0;
        s.refresh_view(None);
    }
    s.dose = s.round_state().map(|r| r.dose).unwrap_or(1.0);
    s.dose_recorded = s.dose;
    s.screens.close(Mode::Heal);
    s.screens.close(Mode::Iterate);
    s.status = format!("round {round}: generating steered completions at c* {c_star:.3}");
}

fn add_rows(s: &mut State, round: u32, prompt_index: usize, file: String, rows: Vec<ScoredCompletion>) {
    let ids = rows.iter().map(|r| r.completion.id.clone()).collect();
    apply_event(&mut s.session, &SessionEvent::CompletionsGenerated { round, prompt_index, file, ids });
    if round == s.round {
        let keep = s.current_id();
        let known: BTreeSet<String> = s.rows.iter().map(|r| r.completion.id.clone()).collect();
        s.rows.extend(rows.into_iter().filter(|r| !known.contains(&r.completion.id)));
        s.refresh_view(keep);
    }
}

fn on_worker(s: &mut State, e: WorkerEvent) -> Vec<Job> {
    match e {
        WorkerEvent::Started { id, tag } => {
            s.jobs.insert(id, JobView { tag, done: 0, total: 0, msg: String::new() });
            if tag == JobTag::Generate {
                s.live = Some((id, BTreeMap::new()));
            }
        }
        WorkerEvent::Progress { id, done, total, msg } => {
            if let Some(j) = s.jobs.get_mut(&id) {
                j.done = done;
                j.total = total;
                j.msg = msg;
            }
        }
        WorkerEvent::Token { id, row, text } => {
            if let Some(r) = s.replay.as_mut().filter(|r| r.job == id) {
                r.streamed.push_str(&text);
            } else if let Some((job, rows)) = s.live.as_mut() {
                if *job == id {
                    rows.entry(row).or_default().push_str(&text);
                }
            }
        }
        WorkerEvent::RoundStarted { round, c_star, .. } => on_round_started(s, round, c_star),
        WorkerEvent::Completions { round, part, file, rows, .. } => add_rows(s, round, part, file, rows),
        WorkerEvent::ModelReady { model, vector_layers, round, .. } => {
            // After heal the student curates no round; the header keeps naming the round's vector.
            let vector_layers = match (&s.model, round) {
                (ModelStatus::Ready { vector_layers: old, .. }, None) => old.clone(),
                _ => vector_layers,
            };
            s.model = ModelStatus::Ready { model, vector_layers };
        }
        WorkerEvent::HealStep { id, round, record } => iterate::on_heal_step(s, id, round, *record),
        WorkerEvent::Finished { id, output } => {
            s.jobs.remove(&id);
            s.saving.remove(&id);
            return on_output(s, id, output);
        }
        WorkerEvent::Failed { id, error } => {
            let tag = s.jobs.remove(&id).map(|j| j.tag);
            if let Some(event) = s.saving.remove(&id) {
                s.not_saved += 1;
                // Nothing on screen may claim to be saved when it is not: re-read the log (behind any append
                // still queued, so those stay shown) and say what was lost.
                let what = describe_unsaved(&event);
                s.status = format!("NOT SAVED: {what}");
                error_popup(
                    s,
                    &format!("Failed while {}", JobTag::Record.label()),
                    format!("{error}\nNot saved: {what}"),
                );
                let round = s.round;
                return vec![s.job(JobKind::Refold { round })];
            }
            if s.live.as_ref().is_some_and(|l| l.0 == id) {
                s.live = None;
            }
            if s.replay.as_ref().is_some_and(|r| r.job == id) {
                s.replay = None;
            }
            if s.loop_job == Some(id) {
                s.loop_job = None;
                if !matches!(s.model, ModelStatus::Ready { .. }) {
                    s.model = ModelStatus::Failed(error.clone());
                }
            }
            iterate::job_ended(s, id);
            let title = match tag {
                Some(t) => format!("Failed while {}", t.label()),
                None => "A background job failed".to_string(),
            };
            error_popup(s, &title, error);
        }
        WorkerEvent::Cancelled { id } => {
            s.jobs.remove(&id);
            if s.loop_job == Some(id) {
                s.loop_job = None;
            }
            iterate::job_ended(s, id);
            if s.live.as_ref().is_some_and(|l| l.0 == id) {
                s.live = None;
            }
        }
    }
    vec![]
}

/// The session as saved: it replaces the fold on screen; appends queued after the re-read are shown again.
fn on_refolded(s: &mut State, id: JobId, state: SessionState, round: u32, rows: Vec<ScoredCompletion>) {
    s.session = state;
    let later: Vec<SessionEvent> = s.saving.range(id + 1..).map(|(_, e)| e.clone()).collect();
    for e in &later {
        apply_event(&mut s.session, e);
    }
    if round == s.round && !rows.is_empty() {
        s.rows = rows;
    }
    s.dose_recorded = s.session.rounds.get(&s.round).map(|r| r.dose).unwrap_or(s.dose_recorded);
    s.refresh_view(None);
}

/// What an unsaved event meant, in the researcher's words.
fn describe_unsaved(e: &SessionEvent) -> String {
    match e {
        SessionEvent::Decision { completion, decision, .. } => format!(
            "{} {completion} (the list now shows what is on disk; decide again once the disk has room)",
            decision.name()
        ),
        SessionEvent::GateWritten { gate, .. } => format!("gate {} (write it again)", gate.name()),
        SessionEvent::ReplayAdopted { completion, .. } => format!("the adopted replay of {completion}"),
        SessionEvent::DoseChanged { dose, .. } => format!("dose {dose:.2}"),
        _ => "the last change".to_string(),
    }
}

/// A gate is on disk: run the loop on, or, while a run is still going (it may already have stopped looking
/// for the gate), once that run ends at a gate.
fn resume_loop(s: &mut State) -> Vec<Job> {
    if s.loop_job.is_some() {
        s.resume_after_run = true;
        return vec![];
    }
    run_loop(s)
}

/// A rounds job ended: show what it waits for.
fn on_loop_stopped(s: &mut State, stopped: &Stopped) -> Vec<Job> {
    s.status = stopped.to_string();
    // A gate the researcher passed while the run was still going (recorded after the run last looked) is on
    // disk now: the loop goes on.
    let resume = std::mem::take(&mut s.resume_after_run);
    if resume && matches!(stopped, Stopped::AwaitingGateQ0(_) | Stopped::AwaitingGateQ1(_)) {
        return run_loop(s);
    }
    match stopped {
        Stopped::AwaitingGateQ0(r) => {
            if *r != s.round {
                let c = s.session.rounds.get(r).map(|x| x.base_dose).unwrap_or(0.0);
                on_round_started(s, *r, c);
            }
            s.screens.close(Mode::Heal);
            s.screens.close(Mode::Iterate);
            s.status = format!("round {r}: curate its completions, then pass gate Q0 (P)");
            vec![]
        }
        Stopped::AwaitingGateQ1(r) => {
            s.screens.open(Screen::Heal(iterate::HealView {
                round: *r,
                report: None,
                scroll: 0,
                note: String::new(),
            }));
            s.status = format!("round {r} healed: keep or drop it (gate Q1)");
            vec![s.job(JobKind::ReadGateQ1 { round: *r })]
        }
        Stopped::Reached(_) | Stopped::Floor { .. } => {
            s.screens.close(Mode::Heal);
            if matches!(stopped, Stopped::Reached(_)) {
                s.status = format!("round {} judged; continue (c) prepares the next round", s.round);
            }
            let mut jobs = iterate::open(s);
            jobs.retain(|j| !matches!(j.kind, JobKind::RoundsStatus));
            jobs
        }
        _ => vec![],
    }
}

fn on_output(s: &mut State, id: JobId, out: JobOutput) -> Vec<Job> {
    match out {
        JobOutput::Completions { round, prompt_index, file, rows } => {
            if s.live.as_ref().is_some_and(|l| l.0 == id) {
                s.live = None;
            }
            s.generating.remove(&prompt_index);
            add_rows(s, round, prompt_index, file, rows);
        }
        JobOutput::Replayed { row, .. } => {
            if let Some(r) = s.replay.as_mut().filter(|r| r.job == id) {
                r.result = Some(row);
                s.status = format!(
                    "replay ready: {} adopt, {} discard",
                    s.keymap.hint(Mode::GateQ0, Action::AdoptReplay),
                    s.keymap.hint(Mode::GateQ0, Action::DiscardReplay)
                );
            }
        }
        JobOutput::Rescored { round, file, scores } => {
            apply_event(&mut s.session, &SessionEvent::Rescored { round, file });
            if round == s.round {
                for r in s.rows.iter_mut() {
                    if let Some(sc) = scores.get(&r.completion.id) {
                        r.score = sc.clone();
                    }
                }
                s.refresh_view(None);
                s.status = format!("rescored {} completions", scores.len());
            }
        }
        JobOutput::Recorded { event, .. } => match event {
            // The researcher's gate is on disk: the loop goes on (heal after Q0; bake and eval after Q1 keep;
            // the next round after a Q1 drop).
            SessionEvent::GateWritten { gate: Gate::Q0, passed: true, round, .. } if round == s.round => {
                s.screens.open(Screen::Heal(iterate::HealView {
                    round,
                    report: None,
                    scroll: 0,
                    note: String::new(),
                }));
                return resume_loop(s);
            }
            SessionEvent::RoundGate { gate: Gate::Q1, .. } => return resume_loop(s),
            _ => {}
        },
        JobOutput::Rounds { points, chain, branch, stopped } => {
            let mut jobs = vec![];
            if s.loop_job == Some(id) {
                s.loop_job = None;
                if let Some(st) = &stopped {
                    jobs = on_loop_stopped(s, st);
                }
            }
            jobs.extend(iterate::on_rounds(s, id, points, chain, branch, stopped));
            return jobs;
        }
        JobOutput::Refolded { state, round, rows } => on_refolded(s, id, *state, round, rows),
        JobOutput::GateQ1 { round, report, steps } => iterate::on_gate_q1(s, id, round, *report, steps),
        JobOutput::EvalSamples { samples } => iterate::on_samples(s, id, samples),
    }
    vec![]
}

#[cfg(test)]
mod tests;
