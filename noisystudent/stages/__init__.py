"""The stages (layer 7): teacher, pseudo-label, student, fine-tune, evaluate, each usable alone
and resumable (a stage skips work whose outputs are complete on disk), plus the single-stage
runner behind ``noisystudent teacher|pseudo-label|student`` and the run directory's layout."""
