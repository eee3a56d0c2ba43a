"""The code file of every logged generation (MLflow's "models from code"). MLflow copies it into the
model and runs it to build the pyfunc model, when logging and when loading, instead of unpickling an
object: unpickling can run arbitrary code, and MLflow warns on every log. The weights and the data
config stay artifacts; noisystudent's code travels as the model's code path.

Run by MLflow as a standalone file, so the import is absolute."""

import mlflow.models

from noisystudent.tracking.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
