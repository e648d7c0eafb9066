-- Number held for a migration of a branch merged alongside 0018; replaced by it at merge.
SELECT 1;
