"""attnc IR: nodes, lowering from the AST, semantics (the reference), and tile analysis."""
