"""Built-in text samples for calibration and evaluation (original text written for edgepipe).

Read them with `edgepipe.schema.shipped.read_builtin_text(name)`; recipes name them as
`{builtin: prose|code|cjk|mixed}`.
"""
