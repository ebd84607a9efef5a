//! Keymaps as data: key-string parser (`ctrl-s`, `G`, `pagedown`, sequences `g g`), one table per mode, the
//! shipped `keymaps/default.toml` merged with a user file per (mode, key), lookup with pending sequences, the
//! reverse index the help overlay and status bar read, and the generated markdown table for the docs.
//!
//! Errors are hard and precise: unknown mode, unknown action, an action that means nothing on that screen, a
//! bad key string, the same key spelled twice, or a key that is both a binding and the start of a sequence.

use super::action::{Action, Mode};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The shipped bindings, the single source of truth for defaults.
pub const DEFAULT_KEYMAP: &str = include_str!("../../keymaps/default.toml");
/// The shipped vim-flavoured example override.
pub const VIM_KEYMAP: &str = include_str!("../../keymaps/vim.toml");

/// A key without modifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyCode {
    /// A character (upper-case letters are themselves; no shift needed).
    Char(char),
    /// Enter / return.
    Enter,
    /// Escape.
    Esc,
    /// Tab.
    Tab,
    /// Shift-tab.
    BackTab,
    /// Backspace.
    Backspace,
    /// Delete.
    Delete,
    /// Insert.
    Insert,
    /// Home.
    Home,
    /// End.
    End,
    /// Page up.
    PageUp,
    /// Page down.
    PageDown,
    /// Arrow up.
    Up,
    /// Arrow down.
    Down,
    /// Arrow left.
    Left,
    /// Arrow right.
    Right,
    /// Function key 1..=12.
    F(u8),
}

const NAMED: &[(&str, KeyCode)] = &[
    ("enter", KeyCode::Enter),
    ("ret", KeyCode::Enter),
    ("esc", KeyCode::Esc),
    ("tab", KeyCode::Tab),
    ("backtab", KeyCode::BackTab),
    ("backspace", KeyCode::Backspace),
    ("delete", KeyCode::Delete),
    ("del", KeyCode::Delete),
    ("insert", KeyCode::Insert),
    ("home", KeyCode::Home),
    ("end", KeyCode::End),
    ("pageup", KeyCode::PageUp),
    ("pagedown", KeyCode::PageDown),
    ("up", KeyCode::Up),
    ("down", KeyCode::Down),
    ("left", KeyCode::Left),
    ("right", KeyCode::Right),
    ("space", KeyCode::Char(' ')),
    ("minus", KeyCode::Char('-')),
];

/// A key with modifiers, normalised so that one physical key has one value (`shift-a` is `A`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyChord {
    /// The key.
    pub code: KeyCode,
    /// Control held.
    pub ctrl: bool,
    /// Alt held.
    pub alt: bool,
    /// Shift held (never set for characters; see `normalised`).
    pub shift: bool,
}

impl KeyChord {
    /// A plain key.
    pub fn new(code: KeyCode) -> Self {
        KeyChord { code, ctrl: false, alt: false, shift: false }
    }
    /// A plain character key.
    pub fn char(c: char) -> Self {
        Self::new(KeyCode::Char(c))
    }
    /// Control + character.
    pub fn ctrl(c: char) -> Self {
        KeyChord { ctrl: true, ..Self::char(c) }
    }
    /// One value per physical key: shift folds into the character (`shift-a` → `A`, shift-tab → backtab).
    pub fn normalised(mut self) -> Self {
        match self.code {
            KeyCode::Char(c) if self.shift => {
                self.shift = false;
                if c.is_lowercase() {
                    let mut up = c.to_uppercase();
                    if let (Some(u), None) = (up.next(), up.next()) {
                        self.code = KeyCode::Char(u);
                    }
                }
            }
            KeyCode::Tab if self.shift => {
                self.shift = false;
                self.code = KeyCode::BackTab;
            }
            _ => {}
        }
        self
    }

    /// Parse one key string: `a`, `A`, `?`, `ctrl-s`, `alt-shift-left`, `f5`, `space`, `ctrl--`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        if s.is_empty() {
            return Err("empty key".into());
        }
        // A lone "-" or a trailing "--" means the minus key itself.
        let (mods, key) = if s == "-" {
            ("", "-")
        } else if let Some(m) = s.strip_suffix("--") {
            (m, "-")
        } else {
            match s.rsplit_once('-') {
                Some((m, k)) => (m, k),
                None => ("", s),
            }
        };
        let mut chord = KeyChord::new(KeyCode::Char(' '));
        if !mods.is_empty() {
            for m in mods.split('-') {
                match m.to_ascii_lowercase().as_str() {
                    "ctrl" | "c" => chord.ctrl = true,
                    "alt" | "a" | "m" => chord.alt = true,
                    "shift" | "s" => chord.shift = true,
                    other => return Err(format!("unknown modifier `{other}` (use ctrl, alt, shift)")),
                }
            }
        }
        let mut chars = key.chars();
        chord.code = match (chars.next(), chars.next()) {
            (Some(c), None) => KeyCode::Char(c),
            _ => {
                let lower = key.to_ascii_lowercase();
                if let Some((_, code)) = NAMED.iter().find(|(n, _)| *n == lower) {
                    *code
                } else if let Some(n) = lower.strip_prefix('f').and_then(|d| d.parse::<u8>().ok()) {
                    if !(1..=12).contains(&n) {
                        return Err(format!("function key `{key}` is out of range (f1..f12)"));
                    }
                    KeyCode::F(n)
                } else {
                    return Err(format!("unknown key name `{key}`"));
                }
            }
        };
        Ok(chord.normalised())
    }

    /// Parse a space-separated key sequence (`g g`).
    pub fn parse_sequence(s: &str) -> std::result::Result<Vec<Self>, String> {
        let keys: Vec<&str> = s.split(' ').filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            return Err("empty key".into());
        }
        keys.into_iter().map(Self::parse).collect()
    }
}

impl fmt::Display for KeyChord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ctrl {
            f.write_str("ctrl-")?;
        }
        if self.alt {
            f.write_str("alt-")?;
        }
        if self.shift {
            f.write_str("shift-")?;
        }
        match self.code {
            KeyCode::Char(' ') => f.write_str("space"),
            KeyCode::Char(c) => write!(f, "{c}"),
            KeyCode::F(n) => write!(f, "f{n}"),
            code => {
                let name = NAMED.iter().find(|(_, c)| *c == code).map(|(n, _)| *n).unwrap_or("?");
                f.write_str(name)
            }
        }
    }
}

/// Format a key sequence the way keymap files spell it.
pub fn sequence_string(keys: &[KeyChord]) -> String {
    keys.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

/// One binding and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// The action.
    pub action: Action,
    /// The file that set it.
    pub source: String,
}

/// One line of a keymap file: the key sequence, its spelling in the file, and the action (`None` unbinds).
type LayerEntry = (Vec<KeyChord>, String, Option<Action>);

/// One parsed keymap file: per mode, its entries.
#[derive(Debug, Clone, Default)]
pub struct Layer {
    source: String,
    tables: BTreeMap<Mode, Vec<LayerEntry>>,
}

impl Layer {
    /// Parse a keymap file's text; `source` (a path) names it in errors.
    pub fn parse(text: &str, source: &Path) -> Result<Self> {
        let src = source.display().to_string();
        let err = |msg: String| Error::bad_file(source, msg);
        let table: toml::Table = toml::from_str(text).map_err(|e| err(format!("not a valid keymap: {e}")))?;
        let mut layer = Layer { source: src, tables: BTreeMap::new() };
        for (mode_name, value) in &table {
            let mode = Mode::parse(mode_name).ok_or_else(|| {
                let names: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
                err(format!("unknown table [{mode_name}] (screens: {})", names.join(", ")))
            })?;
            let entries = value.as_table().ok_or_else(|| err(format!("[{mode_name}] must be a table")))?;
            let mut seen: BTreeMap<Vec<KeyChord>, String> = BTreeMap::new();
            let mut out = Vec::new();
            for (key, action) in entries {
                let keys = KeyChord::parse_sequence(key)
                    .map_err(|e| err(format!("[{mode_name}] key \"{key}\": {e}")))?;
                let name = action.as_str().ok_or_else(|| {
                    err(format!("[{mode_name}] key \"{key}\": the action must be a string"))
                })?;
                let action = if name == "none" {
                    None
                } else {
                    let a = Action::parse(name).ok_or_else(|| {
                        err(format!("[{mode_name}] key \"{key}\": unknown action `{name}`"))
                    })?;
                    if !a.available_in(mode) {
                        return Err(err(format!(
                            "[{mode_name}] key \"{key}\": action `{name}` does nothing on this screen"
                        )));
                    }
                    Some(a)
                };
                if let Some(other) = seen.insert(keys.clone(), key.clone()) {
                    return Err(err(format!(
                        "[{mode_name}] key \"{key}\": duplicate binding (\"{other}\" is the same key)"
                    )));
                }
                out.push((keys, key.clone(), action));
            }
            layer.tables.insert(mode, out);
        }
        Ok(layer)
    }
}

/// The merged keymap: per mode, key sequence → binding.
#[derive(Debug, Clone, Default)]
pub struct Keymap {
    tables: BTreeMap<Mode, BTreeMap<Vec<KeyChord>, Binding>>,
    sources: Vec<String>,
}

/// What a key press means given the keys already pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyResult {
    /// A complete binding.
    Matched(Action),
    /// The start of a sequence; wait for more keys.
    Pending,
    /// Not bound.
    NotFound,
}

/// Where a user keymap is looked for: `$XDG_CONFIG_HOME/steer-heal/keymap.toml`, else `~/.config/…`.
pub fn user_keymap_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("steer-heal").join("keymap.toml"))
}

impl Keymap {
    /// The shipped defaults only.
    pub fn defaults() -> Result<Self> {
        let mut k = Keymap::default();
        k.merge(Layer::parse(DEFAULT_KEYMAP, Path::new("keymaps/default.toml"))?)?;
        Ok(k)
    }

    /// Defaults, then the user's file: `explicit` (`--keymap PATH`, must exist) or else the XDG file if present.
    pub fn load(explicit: Option<&Path>) -> Result<Self> {
        let mut k = Self::defaults()?;
        let user = match explicit {
            Some(p) => {
                if !p.exists() {
                    return Err(Error::MissingFile { path: p.to_path_buf(), what: "keymap file".into() });
                }
                Some(p.to_path_buf())
            }
            None => user_keymap_path().filter(|p| p.exists()),
        };
        if let Some(p) = user {
            let text = std::fs::read_to_string(&p).map_err(|e| Error::bad_file(&p, e))?;
            k.merge(Layer::parse(&text, &p)?)?;
            if k.keys_for(Mode::GateQ0, Action::Quit).is_empty() {
                return Err(Error::bad_file(
                    &p,
                    "no key is bound to `quit` any more (on the gate-Q0 screen): bind it to a key, or there is \
                     no way out",
                ));
            }
        }
        Ok(k)
    }

    /// Apply a layer on top: its bindings replace same-key bindings; `none` removes one. The result is
    /// checked for keys that are both a binding and the start of a longer sequence.
    pub fn merge(&mut self, layer: Layer) -> Result<()> {
        for (mode, entries) in layer.tables {
            let table = self.tables.entry(mode).or_default();
            for (keys, _, action) in entries {
                match action {
                    Some(a) => {
                        table.insert(keys, Binding { action: a, source: layer.source.clone() });
                    }
                    None => {
                        table.remove(&keys);
                    }
                }
            }
            for (keys, b) in table.iter() {
                if let Some((longer, _)) =
                    table.iter().find(|(k, _)| k.len() > keys.len() && k.starts_with(keys))
                {
                    return Err(Error::bad_file(
                        &b.source,
                        format!(
                            "[{mode}] key \"{}\" is bound and also starts the sequence \"{}\"; unbind one",
                            sequence_string(keys),
                            sequence_string(longer)
                        ),
                    ));
                }
            }
        }
        self.sources.push(layer.source);
        Ok(())
    }

    /// Files merged, in order.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    fn lookup(&self, mode: Mode, seq: &[KeyChord]) -> KeyResult {
        let Some(t) = self.tables.get(&mode) else { return KeyResult::NotFound };
        if let Some(b) = t.get(seq) {
            return KeyResult::Matched(b.action);
        }
        if t.keys().any(|k| k.len() > seq.len() && k.starts_with(seq)) {
            return KeyResult::Pending;
        }
        KeyResult::NotFound
    }

    /// What `key` means in `mode` after the `pending` keys of an unfinished sequence. The mode's table is
    /// consulted before `[global]`.
    pub fn resolve(&self, mode: Mode, pending: &[KeyChord], key: KeyChord) -> KeyResult {
        let mut seq = pending.to_vec();
        seq.push(key.normalised());
        match self.lookup(mode, &seq) {
            KeyResult::NotFound if mode.uses_global() => self.lookup(Mode::Global, &seq),
            r => r,
        }
    }

    /// Key strings bound to `action` in `mode` (and, where it applies, `[global]`), sorted shortest first.
    pub fn keys_for(&self, mode: Mode, action: Action) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut modes = vec![mode];
        if mode.uses_global() {
            modes.push(Mode::Global);
        }
        for m in modes {
            if let Some(t) = self.tables.get(&m) {
                for (k, b) in t {
                    // A global key that the mode rebinds does not reach the global action.
                    if m == Mode::Global && m != mode && self.lookup(mode, k) != KeyResult::NotFound {
                        continue;
                    }
                    if b.action == action {
                        out.push(sequence_string(k));
                    }
                }
            }
        }
        out.sort_by_key(|s| (s.chars().count(), s.clone()));
        out.dedup();
        out
    }

    /// The first key for an action, for hints (`?` when unbound).
    pub fn hint(&self, mode: Mode, action: Action) -> String {
        self.keys_for(mode, action).into_iter().next().unwrap_or_else(|| "?".into())
    }

    /// Rows of the help overlay: per mode, (keys, action) sorted by action order.
    pub fn help_rows(&self) -> Vec<(Mode, Vec<(String, Action)>)> {
        let mut out = Vec::new();
        for mode in Mode::ALL {
            let Some(t) = self.tables.get(&mode) else { continue };
            let mut by_action: BTreeMap<Action, Vec<String>> = BTreeMap::new();
            for (k, b) in t {
                by_action.entry(b.action).or_default().push(sequence_string(k));
            }
            let rows: Vec<(String, Action)> = by_action
                .into_iter()
                .map(|(a, mut ks)| {
                    ks.sort_by_key(|s| (s.chars().count(), s.clone()));
                    (ks.join(", "), a)
                })
                .collect();
            if !rows.is_empty() {
                out.push((mode, rows));
            }
        }
        out
    }

    /// Every action bound anywhere.
    pub fn bound_actions(&self) -> Vec<Action> {
        let mut v: Vec<Action> = self.tables.values().flat_map(|t| t.values().map(|b| b.action)).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The keymap reference as markdown tables (the generated section of `docs/keymap.md` / `spec.md`).
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str("Generated from the merged keymap by `steer-heal keymap-doc`; do not edit by hand.\n");
        for (mode, rows) in self.help_rows() {
            s.push_str(&format!(
                "\n#### `[{}]` — {}\n\n| keys | action | what it does |\n|---|---|---|\n",
                mode.name(),
                mode.title()
            ));
            for (keys, a) in rows {
                let keys: Vec<String> = keys.split(", ").map(|k| format!("`{k}`")).collect();
                s.push_str(&format!("| {} | `{}` | {} |\n", keys.join(" "), a.name(), a.description()));
            }
        }
        s
    }
}

/// Start marker of the generated keymap block in markdown files.
pub const DOC_START: &str = "<!-- keymap:start -->";
/// End marker of the generated keymap block.
pub const DOC_END: &str = "<!-- keymap:end -->";

/// Replace the text between the markers of `doc` with `table` (appending a marked section when absent).
pub fn splice_doc(doc: &str, table: &str) -> String {
    let block = format!("{DOC_START}\n{table}{DOC_END}");
    match (doc.find(DOC_START), doc.find(DOC_END)) {
        (Some(a), Some(b)) if b > a => format!("{}{}{}", &doc[..a], block, &doc[b + DOC_END.len()..]),
        _ => {
            let sep = if doc.is_empty() || doc.ends_with("\n\n") {
                ""
            } else if doc.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{doc}{sep}{block}\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> KeyChord {
        KeyChord::parse(s).unwrap_or(KeyChord::new(KeyCode::F(12)))
    }

    #[test]
    fn key_strings() {
        assert_eq!(k("a"), KeyChord::char('a'));
        assert_eq!(k("A"), KeyChord::char('A'));
        assert_eq!(k("shift-a"), KeyChord::char('A'));
        assert_eq!(k("ctrl-s"), KeyChord::ctrl('s'));
        assert_eq!(k("C-s"), KeyChord::ctrl('s'));
        assert_eq!(k("shift-tab"), KeyChord::new(KeyCode::BackTab));
        assert_eq!(k("-"), KeyChord::char('-'));
        assert_eq!(k("ctrl--"), KeyChord::ctrl('-'));
        assert_eq!(k("space"), KeyChord::char(' '));
        assert_eq!(k("PageDown"), KeyChord::new(KeyCode::PageDown));
        assert_eq!(k("f5"), KeyChord::new(KeyCode::F(5)));
        let alt_up = KeyChord { alt: true, shift: true, ..KeyChord::new(KeyCode::Up) };
        assert_eq!(k("alt-shift-up"), alt_up);
        assert_eq!(alt_up.to_string(), "alt-shift-up");
        assert_eq!(KeyChord::parse_sequence("g g"), Ok(vec![KeyChord::char('g'); 2]));
        for bad in ["", "ctrl-", "hyper-x", "f13", "pgdn", "ctrl-shift-"] {
            assert!(KeyChord::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn display_parses_back() {
        for s in ["a", "A", "?", "ctrl-s", "alt-left", "f1", "space", "pagedown", "backtab", "-", "ctrl--"] {
            assert_eq!(k(&k(s).to_string()), k(s), "{s}");
        }
    }

    fn layer(text: &str, name: &str) -> Result<Layer> {
        Layer::parse(text, Path::new(name))
    }

    fn err(r: Result<impl std::fmt::Debug>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn defaults_and_vim_parse_without_conflicts() -> Result<()> {
        let mut km = Keymap::defaults()?;
        km.merge(layer(VIM_KEYMAP, "keymaps/vim.toml")?)?;
        Ok(())
    }

    #[test]
    fn every_action_is_bound_by_default() -> Result<()> {
        let km = Keymap::defaults()?;
        let bound = km.bound_actions();
        for (a, n, _) in crate::tui::action::ACTIONS {
            assert!(bound.contains(a), "`{n}` has no default key");
        }
        Ok(())
    }

    #[test]
    fn unknown_action_names_file_and_key() {
        let e = err(layer("[gate-q0]\n\"x\" = \"launch-rockets\"\n", "my.toml"));
        assert_eq!(e, "my.toml: [gate-q0] key \"x\": unknown action `launch-rockets`");
    }

    #[test]
    fn bad_key_string_names_file_and_key() {
        let e = err(layer("[gate-q0]\n\"hyper-x\" = \"accept\"\n", "my.toml"));
        assert_eq!(e, "my.toml: [gate-q0] key \"hyper-x\": unknown modifier `hyper` (use ctrl, alt, shift)");
        let e = err(layer("[gate-q0]\n\"pgdn\" = \"accept\"\n", "my.toml"));
        assert_eq!(e, "my.toml: [gate-q0] key \"pgdn\": unknown key name `pgdn`");
    }

    #[test]
    fn duplicate_binding_is_an_error() {
        // Two spellings of one physical key.
        let e = err(layer("[gate-q0]\n\"A\" = \"accept\"\n\"shift-a\" = \"reject\"\n", "my.toml"));
        assert!(e.starts_with("my.toml: [gate-q0] key \""), "{e}");
        assert!(e.contains("duplicate binding"), "{e}");
        // The same spelling twice is already a TOML error; it still names the file.
        let e = err(layer("[gate-q0]\na = \"accept\"\na = \"reject\"\n", "my.toml"));
        assert!(e.starts_with("my.toml: not a valid keymap:") && e.contains("duplicate key"), "{e}");
    }

    #[test]
    fn unknown_table_and_wrong_screen_are_errors() {
        let e = err(layer("[gate-q9]\na = \"accept\"\n", "my.toml"));
        assert!(e.starts_with("my.toml: unknown table [gate-q9]"), "{e}");
        let e = err(layer("[gate-q0]\na = \"save-edit\"\n", "my.toml"));
        assert_eq!(e, "my.toml: [gate-q0] key \"a\": action `save-edit` does nothing on this screen");
    }

    #[test]
    fn partial_override_keeps_the_rest_and_can_unbind() -> Result<()> {
        let mut km = Keymap::defaults()?;
        let before_reject = km.keys_for(Mode::GateQ0, Action::Reject);
        km.merge(layer("[gate-q0]\na = \"reject\"\nK = \"accept\"\nu = \"none\"\n", "user.toml")?)?;
        assert_eq!(km.resolve(Mode::GateQ0, &[], KeyChord::char('a')), KeyResult::Matched(Action::Reject));
        assert_eq!(km.resolve(Mode::GateQ0, &[], KeyChord::char('K')), KeyResult::Matched(Action::Accept));
        assert_eq!(km.resolve(Mode::GateQ0, &[], KeyChord::char('u')), KeyResult::NotFound);
        // untouched bindings stay
        for key in &before_reject {
            let seq = KeyChord::parse_sequence(key).map_err(Error::invalid)?;
            if seq.len() == 1 && seq[0] != KeyChord::char('a') {
                assert_eq!(km.resolve(Mode::GateQ0, &[], seq[0]), KeyResult::Matched(Action::Reject));
            }
        }
        assert_eq!(
            km.resolve(Mode::GateQ0, &[], KeyChord::char('j')),
            KeyResult::Matched(Action::NextCompletion)
        );
        Ok(())
    }

    #[test]
    fn sequences_resolve_through_pending() -> Result<()> {
        let km = Keymap::defaults()?;
        let g = KeyChord::char('g');
        assert_eq!(km.resolve(Mode::GateQ0, &[], g), KeyResult::Pending);
        assert_eq!(km.resolve(Mode::GateQ0, &[g], g), KeyResult::Matched(Action::FirstCompletion));
        Ok(())
    }

    #[test]
    fn prefix_conflict_is_an_error() -> Result<()> {
        let mut km = Keymap::defaults()?;
        let e = err(km.merge(layer("[gate-q0]\ng = \"accept\"\n", "user.toml")?));
        assert!(e.contains("[gate-q0] key \"g\" is bound and also starts the sequence \"g g\""), "{e}");
        Ok(())
    }

    #[test]
    fn global_applies_except_while_editing_and_modes_win() -> Result<()> {
        let km = Keymap::defaults()?;
        let q = KeyChord::char('q');
        assert_eq!(km.resolve(Mode::GateQ0, &[], q), KeyResult::Matched(Action::Quit));
        assert_eq!(km.resolve(Mode::Edit, &[], q), KeyResult::NotFound);
        // help binds q itself (close), so the global quit does not reach it
        assert_eq!(km.resolve(Mode::Help, &[], q), KeyResult::Matched(Action::Cancel));
        assert!(!km.keys_for(Mode::Help, Action::Quit).contains(&"q".to_string()));
        Ok(())
    }

    #[test]
    fn user_file_from_flag_must_exist() {
        let e = err(Keymap::load(Some(Path::new("/nonexistent/keys.toml"))));
        assert!(e.contains("/nonexistent/keys.toml: missing (keymap file)"), "{e}");
    }

    #[test]
    fn splice_replaces_between_markers() {
        let doc = "# T\n\n<!-- keymap:start -->\nold\n<!-- keymap:end -->\nafter\n";
        assert_eq!(
            splice_doc(doc, "new\n"),
            "# T\n\n<!-- keymap:start -->\nnew\n<!-- keymap:end -->\nafter\n"
        );
        assert_eq!(splice_doc("# T\n", "x\n"), "# T\n\n<!-- keymap:start -->\nx\n<!-- keymap:end -->\n");
    }
}
