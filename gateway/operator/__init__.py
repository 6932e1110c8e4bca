"""The operator's side of `devid serve`: the HTTP listener (`--http`), its authentication (bearer token
or operator certificate), the JSON API (`/api/v1/...`) and the server-rendered web view."""
