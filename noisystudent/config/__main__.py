"""``python -m noisystudent.config > docs/config.md``: the generated config reference."""

from .reference import config_reference_markdown

print(config_reference_markdown())
