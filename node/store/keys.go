package store

import "slices"

// Diff returns the keys in now but not in before (added) and in before but
// not in now (removed), each sorted.
func Diff(before, now map[string]struct{}) (added, removed []string) {
	for k := range now {
		if _, ok := before[k]; !ok {
			added = append(added, k)
		}
	}
	for k := range before {
		if _, ok := now[k]; !ok {
			removed = append(removed, k)
		}
	}
	slices.Sort(added)
	slices.Sort(removed)
	return added, removed
}

// SortedKeys returns the keys of set, sorted.
func SortedKeys(set map[string]struct{}) []string {
	keys := make([]string, 0, len(set))
	for k := range set {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
