"""Who the client is: API keys, JWTs, the admin token and secret files, and the admin key API."""
