"""The HTTP layer: the app builder (app.py), the ingress deployment (ingress.py: wiring), auth,
errors, and one folder per API area (protocol.py: types, service.py: the work, router.py: routes).

Nothing below imports this package (import-linter checks it: pyproject.toml).
"""
