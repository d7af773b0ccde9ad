"""The OpenAI API layer shared by the server and the router. Nothing under this package imports torch."""
