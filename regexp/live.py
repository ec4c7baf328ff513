"""Findings while a run trains (docs/diagnostics.md, "While it trains"): each record a run
writes to metrics.jsonl goes through the diagnosis rules (regexp.diagnose.Watch) at once.
A new finding is one console line and a `finding` event in the run's records (metrics.jsonl,
W&B); with monitor.on_finding=stop the first decisive one ends the run (status `stopped`).

The end-of-run diagnosis feeds the same records through the same rules, so the findings
announced here are the ones it reports, at the same steps.
"""

from typing import Any, Optional

from regexp.diagnose import Finding, Watch
from regexp.tracking import Reporter, Tracker

# The key that marks a finding event among a run's records; the rules ignore such records.
FINDING_RULE = "finding/rule"


def finding_event(finding: Finding) -> dict[str, Any]:
    """A finding as one record of metrics.jsonl, at the step where it first held."""
    return {"step": finding.step, FINDING_RULE: finding.rule, "finding/title": finding.title,
            "finding/decisive": finding.decisive, "finding/message": finding.message}


class LiveFindings:
    """One run's rules as it trains (each member of a fused group has its own). `stop`:
    monitor.on_finding=stop, so the first decisive finding is kept in `decisive` for the
    loop to end the run on."""

    def __init__(self, watch: Watch, tracker: Tracker, reporter: Reporter, stop: bool):
        self.watch, self.tracker, self.reporter, self.stop = watch, tracker, reporter, stop
        self.decisive: Optional[Finding] = None

    @property
    def inactive(self) -> list[str]:
        return self.watch.inactive

    def replay(self, records: list[dict[str, Any]]) -> None:
        """A resumed run's records up to its checkpoint, fed silently: what they tripped was
        announced when they were written."""
        for record in records:
            self.watch.feed(record)

    def observe(self, record: dict[str, Any], label: str = "") -> None:
        """`record`, just written: each finding it trips is announced and recorded."""
        for finding in self.watch.feed(record):
            stops = finding.decisive and self.stop and self.decisive is None
            if stops:
                self.decisive = finding
            self.tracker.write(finding_event(finding))
            self.reporter.finding(finding.step, finding.title, finding.evidence, finding.interventions[:1],
                                  consequence(finding, self.stop, stops), label)


def consequence(finding: Finding, stop: bool, stops: bool) -> str:
    """What `finding` does to the run, for its console line: `stop` is monitor.on_finding=stop,
    `stops` whether this finding is the one that ends the run."""
    if not finding.decisive:
        return ""
    if stops:
        return "monitor.on_finding=stop: the run stops here"
    return "decisive as well" if stop else "decisive: monitor.on_finding=stop would end the run here"
