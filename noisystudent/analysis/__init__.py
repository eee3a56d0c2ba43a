"""Hidden-state analysis (layer 8): OOD scores, probes, embeddings, galleries and reports for a
model (:mod:`.model`) and across a run's generations (:mod:`.run`). It uses the stages' labeling
pass and never imports the generation loop."""
