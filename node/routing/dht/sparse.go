package dht

// sparse maps keys to a few values each, where most keys have exactly one:
// such a key takes one map entry in one, and no slice. The provider cache
// (a key's holders) and the record store (a key's provider records) are
// both shaped so: a key that one peer provides, with the odd second.
type sparse[K comparable, V any] struct {
	one  map[K]V   // keys with exactly one value
	many map[K][]V // keys with more
}

func newSparse[K comparable, V any]() sparse[K, V] {
	return sparse[K, V]{one: make(map[K]V), many: make(map[K][]V)}
}

// get returns k's values; the slice may be modified and passed to put.
func (m sparse[K, V]) get(k K) []V {
	if v, ok := m.one[k]; ok {
		return []V{v}
	}
	return m.many[k]
}

// put sets k's values; none removes k.
func (m sparse[K, V]) put(k K, vs []V) {
	switch len(vs) {
	case 0:
		delete(m.one, k)
		delete(m.many, k)
	case 1:
		m.one[k] = vs[0]
		delete(m.many, k)
	default:
		m.many[k] = vs
		delete(m.one, k)
	}
}

// keys returns how many keys have values.
func (m sparse[K, V]) keys() int { return len(m.one) + len(m.many) }

// interner numbers values in the order they are first seen, so that a
// table can hold a small index in place of each value.
type interner[T comparable] struct {
	ids   []T          // index -> value
	index map[T]uint32 // value -> index
}

func newInterner[T comparable]() interner[T] {
	return interner[T]{index: make(map[T]uint32)}
}

// id returns v's index, numbering v if it is new.
func (in *interner[T]) id(v T) uint32 {
	if i, ok := in.index[v]; ok {
		return i
	}
	i := uint32(len(in.ids))
	in.ids = append(in.ids, v)
	in.index[v] = i
	return i
}

// lookup returns v's index, if v has one.
func (in *interner[T]) lookup(v T) (uint32, bool) {
	i, ok := in.index[v]
	return i, ok
}

// value returns the value numbered i.
func (in *interner[T]) value(i uint32) T { return in.ids[i] }

// peerValue is a value that one interned peer gave.
type peerValue interface{ peerIndex() uint32 }

// indexOfPeer returns the position of the value that peer i gave in vs, or
// -1.
func indexOfPeer[V peerValue](vs []V, i uint32) int {
	for j, v := range vs {
		if v.peerIndex() == i {
			return j
		}
	}
	return -1
}

// removePeer drops the value that peer i gave for k, if there is one.
func removePeer[K comparable, V peerValue](m sparse[K, V], k K, i uint32) {
	vs := m.get(k)
	if j := indexOfPeer(vs, i); j >= 0 {
		m.put(k, append(vs[:j:j], vs[j+1:]...))
	}
}
