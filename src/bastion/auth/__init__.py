"""Authentication and admission: who is calling (keys, JWTs) and from where (IP policy)."""
