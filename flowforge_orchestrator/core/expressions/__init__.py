"""CEL expressions and `${{ }}` templates (`templates`), and what an evaluation may cost
(`cost`)."""
