//! What a key means: the `Action` vocabulary that keymap files name (kebab-case), one table of names and
//! descriptions, and the screens (`Mode`s) each action is available in.

use std::fmt;

/// A screen or popup with its own key table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Keys that work on every screen except text editing.
    Global,
    /// The gate-Q0 curation screen.
    GateQ0,
    /// The help overlay.
    Help,
    /// The reason-tag picker.
    Tags,
    /// A text editor (note, prompt); unbound keys type text.
    Edit,
    /// A yes/no question.
    Confirm,
    /// Blind re-show of decided completions.
    Reshow,
    /// The suggested-thresholds panel.
    Stats,
    /// An error or information message.
    Message,
    /// The iterate screen (gate Q2): progress map, rounds table, continue / stop / roll back / fork.
    Iterate,
    /// The heal screen (gate Q1): teacher, student before and healed student side by side.
    Heal,
}

impl Mode {
    /// Every mode, in keymap-file order.
    pub const ALL: [Mode; 11] = [
        Mode::Global,
        Mode::GateQ0,
        Mode::Help,
        Mode::Tags,
        Mode::Edit,
        Mode::Confirm,
        Mode::Reshow,
        Mode::Stats,
        Mode::Message,
        Mode::Iterate,
        Mode::Heal,
    ];
    /// The TOML table name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Global => "global",
            Mode::GateQ0 => "gate-q0",
            Mode::Help => "help",
            Mode::Tags => "tags",
            Mode::Edit => "edit",
            Mode::Confirm => "confirm",
            Mode::Reshow => "reshow",
            Mode::Stats => "stats",
            Mode::Message => "message",
            Mode::Iterate => "iterate",
            Mode::Heal => "heal",
        }
    }
    /// Parse a TOML table name.
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }
    /// A human title for help and docs.
    pub fn title(self) -> &'static str {
        match self {
            Mode::Global => "Everywhere (except while editing text)",
            Mode::GateQ0 => "Gate Q0 screen",
            Mode::Help => "Help overlay",
            Mode::Tags => "Reason-tag picker",
            Mode::Edit => "Text editor (note, prompt); other keys type",
            Mode::Confirm => "Confirmation",
            Mode::Reshow => "Blind re-show",
            Mode::Stats => "Suggested-thresholds panel",
            Mode::Message => "Message popup",
            Mode::Iterate => "Iterate screen (gate Q2)",
            Mode::Heal => "Heal screen (gate Q1)",
        }
    }
    /// Whether `[global]` bindings apply in this mode (not while typing).
    pub fn uses_global(self) -> bool {
        !matches!(self, Mode::Edit | Mode::Global)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything a key can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Leave the TUI (pending work is recorded first).
    Quit,
    /// Show or hide the help overlay.
    ToggleHelp,
    /// Keep the completion.
    Accept,
    /// Drop the completion.
    Reject,
    /// Take back the last decision.
    Undo,
    /// Next row.
    NextCompletion,
    /// Previous row.
    PrevCompletion,
    /// First row.
    FirstCompletion,
    /// Last row.
    LastCompletion,
    /// Next row without a decision.
    NextUndecided,
    /// Ten rows down.
    PageDown,
    /// Ten rows up.
    PageUp,
    /// Open the reason-tag picker.
    TagReasons,
    /// Edit the note of the completion.
    EditNote,
    /// Edit the prompt and generate new completions for it.
    EditPrompt,
    /// Raise the dose slider.
    DoseUp,
    /// Lower the dose slider.
    DoseDown,
    /// Token cursor one left.
    CursorLeft,
    /// Token cursor one right.
    CursorRight,
    /// Token cursor to the first token.
    CursorStart,
    /// Token cursor to the last token.
    CursorEnd,
    /// Token cursor to where the KL window peaks.
    JumpToDrift,
    /// Rewind to the cursor token and replay at the slider's dose (background, latest wins).
    Backtrack,
    /// Replace the completion with the replay preview.
    AdoptReplay,
    /// Drop the replay preview.
    DiscardReplay,
    /// Sort by the next column.
    CycleSort,
    /// Reverse the sort order.
    ReverseSort,
    /// Show the next filter (decision, verdict, reason).
    CycleFilter,
    /// Show every row.
    ClearFilter,
    /// Show or hide suggested thresholds.
    ToggleStats,
    /// Write `gate-q0.md` now.
    WriteGate,
    /// Pass gate Q0 (asks first).
    PassGate,
    /// Re-show a sample of decided items blind.
    StartReshow,
    /// Score the round's completions again (after editing pattern files).
    Rescore,
    /// Scroll the detail pane down.
    ScrollDown,
    /// Scroll the detail pane up.
    ScrollUp,
    /// Toggle reason tag N (1-based).
    ToggleTag(u8),
    /// Say yes / apply.
    Confirm,
    /// Say no / close without applying.
    Cancel,
    /// Save the text being edited.
    SaveEdit,
    /// Open the iterate screen (gate Q2).
    OpenIterate,
    /// Run one more round in the background.
    ContinueRounds,
    /// Stop the round that is running (finished stages are kept; continuing resumes).
    StopRounds,
    /// Roll the student back to the selected kept round.
    RollbackRound,
    /// Start a new branch from the selected kept round.
    ForkRound,
    /// Select the next round.
    NextRound,
    /// Select the previous round.
    PrevRound,
    /// Show the selected round's next eval sample.
    NextSample,
    /// Show the selected round's previous eval sample.
    PrevSample,
    /// Open the heal screen (gate Q1) of the selected round.
    OpenHeal,
    /// Keep the round at gate Q1.
    KeepRound,
    /// Drop the round at gate Q1 (it leaves the student's lineage).
    DropRound,
}

/// Every action with its keymap name and a one-line description.
pub const ACTIONS: &[(Action, &str, &str)] = &[
    (Action::Quit, "quit", "quit (decisions are already saved)"),
    (Action::ToggleHelp, "toggle-help", "show or hide this help"),
    (Action::Accept, "accept", "accept the completion"),
    (Action::Reject, "reject", "reject the completion"),
    (Action::Undo, "undo", "undo the last decision (repeat for more)"),
    (Action::NextCompletion, "next-completion", "next completion"),
    (Action::PrevCompletion, "prev-completion", "previous completion"),
    (Action::FirstCompletion, "first-completion", "first completion"),
    (Action::LastCompletion, "last-completion", "last completion"),
    (Action::NextUndecided, "next-undecided", "jump to the next undecided completion"),
    (Action::PageDown, "page-down", "ten completions down"),
    (Action::PageUp, "page-up", "ten completions up"),
    (Action::TagReasons, "tag-reasons", "pick reason tags"),
    (Action::EditNote, "edit-note", "write a note (on the completion; on the round at gate Q1)"),
    (Action::EditPrompt, "edit-prompt", "edit the prompt and generate from it"),
    (Action::DoseUp, "dose-up", "raise the dose slider"),
    (Action::DoseDown, "dose-down", "lower the dose slider"),
    (Action::CursorLeft, "cursor-left", "token cursor left"),
    (Action::CursorRight, "cursor-right", "token cursor right"),
    (Action::CursorStart, "cursor-start", "token cursor to the first token"),
    (Action::CursorEnd, "cursor-end", "token cursor to the last token"),
    (Action::JumpToDrift, "jump-to-drift", "token cursor to the KL peak"),
    (Action::Backtrack, "backtrack", "rewind to the cursor and replay at the slider dose"),
    (Action::AdoptReplay, "adopt-replay", "keep the replay in place of the completion"),
    (Action::DiscardReplay, "discard-replay", "drop the replay preview"),
    (Action::CycleSort, "cycle-sort", "sort by the next column"),
    (Action::ReverseSort, "reverse-sort", "reverse the sort order"),
    (Action::CycleFilter, "cycle-filter", "filter by decision, verdict or reason"),
    (Action::ClearFilter, "clear-filter", "show all completions"),
    (Action::ToggleStats, "toggle-stats", "show suggested thresholds and agreement"),
    (Action::WriteGate, "write-gate", "write gate-q0.md now"),
    (Action::PassGate, "pass-gate", "pass gate Q0 and write its report"),
    (Action::StartReshow, "start-reshow", "re-show decided completions blind"),
    (Action::Rescore, "rescore", "score the round again (edited pattern files)"),
    (Action::ScrollDown, "scroll-down", "scroll down"),
    (Action::ScrollUp, "scroll-up", "scroll up"),
    (Action::ToggleTag(1), "toggle-tag-1", "toggle reason tag 1"),
    (Action::ToggleTag(2), "toggle-tag-2", "toggle reason tag 2"),
    (Action::ToggleTag(3), "toggle-tag-3", "toggle reason tag 3"),
    (Action::ToggleTag(4), "toggle-tag-4", "toggle reason tag 4"),
    (Action::ToggleTag(5), "toggle-tag-5", "toggle reason tag 5"),
    (Action::ToggleTag(6), "toggle-tag-6", "toggle reason tag 6"),
    (Action::ToggleTag(7), "toggle-tag-7", "toggle reason tag 7"),
    (Action::ToggleTag(8), "toggle-tag-8", "toggle reason tag 8"),
    (Action::ToggleTag(9), "toggle-tag-9", "toggle reason tag 9"),
    (Action::Confirm, "confirm", "yes / apply"),
    (Action::Cancel, "cancel", "no / close"),
    (Action::SaveEdit, "save-edit", "save the text"),
    (Action::OpenIterate, "open-iterate", "open the iterate screen (gate Q2: progress map and rounds)"),
    (Action::ContinueRounds, "continue-rounds", "run one more round in the background"),
    (Action::StopRounds, "stop-rounds", "stop the running round (resumes on continue)"),
    (Action::RollbackRound, "rollback-round", "roll the student back to the selected kept round"),
    (Action::ForkRound, "fork-round", "start a new branch from the selected kept round"),
    (Action::NextRound, "next-round", "select the next round"),
    (Action::PrevRound, "prev-round", "select the previous round"),
    (
        Action::NextSample,
        "next-sample",
        "show the next eval sample (think and answer probabilities) of the round",
    ),
    (Action::PrevSample, "prev-sample", "show the previous eval sample of the round"),
    (Action::OpenHeal, "open-heal", "open the heal screen (gate Q1) of the selected round"),
    (Action::KeepRound, "keep-round", "keep the round (gate Q1)"),
    (Action::DropRound, "drop-round", "drop the round (gate Q1); it leaves the lineage"),
];

impl Action {
    /// The keymap name (`next-undecided`).
    pub fn name(self) -> &'static str {
        ACTIONS.iter().find(|(a, _, _)| *a == self).map(|(_, n, _)| *n).unwrap_or("?")
    }
    /// The one-line description.
    pub fn description(self) -> &'static str {
        ACTIONS.iter().find(|(a, _, _)| *a == self).map(|(_, _, d)| *d).unwrap_or("")
    }
    /// Parse a keymap name.
    pub fn parse(s: &str) -> Option<Action> {
        ACTIONS.iter().find(|(_, n, _)| *n == s).map(|(a, _, _)| *a)
    }
    /// Whether the action means something in `mode`.
    pub fn available_in(self, mode: Mode) -> bool {
        use Action::*;
        match mode {
            Mode::Global => matches!(self, Quit | ToggleHelp),
            Mode::GateQ0 => !matches!(
                self,
                ToggleTag(_)
                    | Confirm
                    | SaveEdit
                    | ContinueRounds
                    | StopRounds
                    | RollbackRound
                    | ForkRound
                    | NextRound
                    | PrevRound
                    | NextSample
                    | PrevSample
                    | OpenHeal
                    | KeepRound
                    | DropRound
            ),
            Mode::Help => matches!(self, ToggleHelp | Cancel | ScrollDown | ScrollUp | Quit),
            Mode::Tags => matches!(self, ToggleTag(_) | Confirm | Cancel),
            Mode::Edit => matches!(self, SaveEdit | Cancel | Quit),
            Mode::Confirm => matches!(self, Confirm | Cancel),
            Mode::Reshow => matches!(self, Accept | Reject | Cancel | ScrollDown | ScrollUp),
            Mode::Stats => matches!(self, ToggleStats | Cancel),
            Mode::Message => matches!(self, Cancel | Confirm),
            Mode::Iterate => matches!(
                self,
                ContinueRounds
                    | StopRounds
                    | RollbackRound
                    | ForkRound
                    | NextRound
                    | PrevRound
                    | NextSample
                    | PrevSample
                    | OpenHeal
                    | Cancel
                    | Quit
                    | ToggleHelp
            ),
            Mode::Heal => {
                matches!(
                    self,
                    KeepRound
                        | DropRound
                        | EditNote
                        | StopRounds
                        | ScrollDown
                        | ScrollUp
                        | Cancel
                        | Quit
                        | ToggleHelp
                )
            }
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut names: Vec<&str> = ACTIONS.iter().map(|(_, n, _)| *n).collect();
        for (a, n, d) in ACTIONS {
            assert_eq!(Action::parse(n), Some(*a));
            assert_eq!(a.name(), *n);
            assert!(!d.is_empty());
        }
        let len = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), len);
        assert_eq!(Action::parse("launch-rockets"), None);
    }

    #[test]
    fn every_action_is_available_somewhere() {
        for (a, n, _) in ACTIONS {
            assert!(Mode::ALL.iter().any(|m| a.available_in(*m)), "{n} is available nowhere");
        }
    }
}
