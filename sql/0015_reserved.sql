-- Number held for a migration of a branch merged alongside 0017; replaced by it at merge.
SELECT 1;
