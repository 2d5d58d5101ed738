"""Who may call the server: API keys (keys.py), their limits (limits.py), TLS (tls.py), and the
`python -m server keys` command (cli.py). The gRPC interceptor that applies them is
server/transport/auth.py.
"""
