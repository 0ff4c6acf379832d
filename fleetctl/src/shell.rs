//! What fleetctl gives the operator's shell: completion scripts (`fleetctl completions
//! bash|zsh|fish`, clap_complete) and manual pages (`fleetctl man [--dir DIR]`, clap_mangen),
//! both generated from the same clap definition the command line is parsed with
//! ([`crate::args::command`]), so they never disagree with `--help`.

use crate::args::CompletionShell;
use crate::client::{usage, CliError};
use std::io::Write;
use std::path::Path;

/// The name completion scripts and manual pages are written for.
const BINARY_NAME: &str = "fleetctl";

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: CompletionShell, out: &mut dyn Write) {
    let mut command = crate::args::command();
    let generator = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(generator, &mut command, BINARY_NAME, out);
}

/// Writes fleetctl's top manual page (roff) to `out`: every verb is named in its COMMANDS
/// section.
pub fn man_page(out: &mut dyn Write) -> Result<(), CliError> {
    clap_mangen::Man::new(man_command())
        .render(out)
        .map_err(|e| CliError::Failed(format!("cannot write the manual page: {e}")))
}

/// Writes `fleetctl.1` and one page per verb and sub-verb (`fleetctl-rollout.1`,
/// `fleetctl-rollout-status.1`, ...) into `dir`, made if missing; returns how many.
pub fn man_pages_into(dir: &Path) -> Result<usize, CliError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        usage(format!(
            "cannot make the directory {} for the manual pages: {e}",
            dir.display()
        ))
    })?;
    clap_mangen::generate_to(man_command(), dir).map_err(|e| {
        usage(format!(
            "cannot write the manual pages into {}: {e}",
            dir.display()
        ))
    })?;
    let n_pages = std::fs::read_dir(dir)
        .map_err(|e| usage(format!("cannot read {}: {e}", dir.display())))?
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with(BINARY_NAME) && name.ends_with(".1")
        })
        .count();
    Ok(n_pages)
}

fn man_command() -> clap::Command {
    crate::args::command().disable_help_subcommand(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_verb_name(command: &clap::Command, out: &mut Vec<String>) {
        for subcommand in command.get_subcommands() {
            out.push(subcommand.get_name().to_string());
        }
    }

    #[test]
    fn completion_scripts_name_the_verbs() {
        for (shell, marker) in [
            (CompletionShell::Bash, "complete -F"),
            (CompletionShell::Zsh, "#compdef fleetctl"),
            (CompletionShell::Fish, "complete -c fleetctl"),
        ] {
            let mut script = Vec::new();
            completions(shell, &mut script);
            let script = String::from_utf8(script).unwrap();
            assert!(script.contains(marker), "{shell:?}: {script}");
            for verb in ["rollout", "bootstrap", "completions", "man"] {
                assert!(script.contains(verb), "{shell:?} lacks {verb}");
            }
        }
    }

    #[test]
    fn the_man_page_names_every_verb_and_the_dir_gets_a_page_per_verb() {
        let mut page = Vec::new();
        man_page(&mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(
            page.starts_with(".ie") || page.contains(".TH fleetctl"),
            "{page}"
        );
        let mut verbs = Vec::new();
        every_verb_name(&crate::args::command(), &mut verbs);
        assert!(verbs.len() > 20);
        for verb in &verbs {
            if verb == "help" {
                continue;
            }
            // roff writes a '-' as "\-".
            let in_roff = verb.replace('-', "\\-");
            assert!(page.contains(&in_roff), "the page does not name {verb}");
        }
        let dir = tempfile::tempdir().unwrap();
        let n_pages = man_pages_into(dir.path()).unwrap();
        assert!(dir.path().join("fleetctl.1").is_file());
        assert!(dir.path().join("fleetctl-rollout.1").is_file());
        assert!(dir.path().join("fleetctl-rollout-status.1").is_file());
        assert!(n_pages > verbs.len(), "{n_pages} pages");
    }
}
