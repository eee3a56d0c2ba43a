"""Deployable forms of a trained model: ONNX export (:mod:`.onnx_export`), int8 quantization
(:mod:`.quantize`) and their side-by-side measurement (:mod:`.measure`). Imports the engine and
below; MLflow logging of the exported models lives in :mod:`noisystudent.tracking.onnx_model`."""
