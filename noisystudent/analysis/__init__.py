"""Hidden-state analysis: OOD scores, probes, embeddings and reports (see :mod:`.stage`)."""
from .run import analyze_checkpoint, analyze_generation, analyze_run, compare_generations, print_analysis_table, with_without
from .scores import OOD_SCORES, KNNScorer, MahalanobisScorer, auroc, energy_score, entropy_score, fpr_at_tpr, msp_score
from .stage import analyze_model

__all__ = ["analyze_model", "analyze_checkpoint", "analyze_generation", "analyze_run", "compare_generations", "print_analysis_table", "with_without",
           "OOD_SCORES", "KNNScorer", "MahalanobisScorer", "auroc", "fpr_at_tpr", "msp_score", "entropy_score",
           "energy_score"]
